"""Who may see the Sync status page and who may requeue or discard: Airflow's own sign-in and roles.

The API server's JWT (the ``_token`` cookie the UI sets at sign-in, or ``Authorization: Bearer`` from
``POST /auth/token``) is resolved by Airflow's :func:`~airflow.api_fastapi.core_api.security.get_user`
and judged by the configured auth manager, so the page follows whatever signs people in: the simple
auth manager of ``make up`` or FAB with GitHub. No new permission is invented (FAB would grant it to
nobody); the page maps onto two that every auth manager knows:

- reading needs read access to the ``opsync_drain`` DAG, whose state the page shows
  (simple auth manager: viewer and up; FAB: Viewer and up);
- requeue and discard need edit access to the ``opsync_buffer`` connection, the site buffer they
  change (simple auth manager: op and admin; FAB: Op and Admin).

A browser's POSTs carry the session cookie on their own, so they must also carry a token only the
page knows (``X-CSRF-Token``, an HMAC of the user's id under Airflow's ``[api] secret_key``); a
request with a Bearer token carries no ambient credential and needs none.
"""

import hashlib
import hmac
from typing import Annotated

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import ConnectionDetails, DagDetails
from airflow.configuration import conf
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from opsync_airflow.hooks import BUFFER_CONN_ID

DRAIN_DAG_ID = "opsync_drain"
CSRF_HEADER = "X-CSRF-Token"
bearer_scheme = HTTPBearer(auto_error=False)  # as Airflow's own: without a Bearer header the cookie counts


class SignInRequired(Exception):
    """Nobody (valid) is signed in and a person asked for the page: send them to Airflow's login, then back."""

    def __init__(self, login_url: str) -> None:
        super().__init__(login_url)
        self.login_url = login_url


class PageForbidden(Exception):
    """Signed in, but without read access: the page says so instead of an empty JSON 403."""

    def __init__(self, user: BaseUser) -> None:
        super().__init__(user.get_name())
        self.user_name = user.get_name()


def auth_manager():
    """Airflow's auth manager. Its module (and :mod:`~airflow.api_fastapi.core_api.security`'s) is imported
    on first use: every Airflow process loads the plugin file, each task too, and these imports take
    seconds, while only the API server, which has them already, serves the page."""
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def may_read(user: BaseUser) -> bool:
    return auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=DRAIN_DAG_ID), user=user)


def may_operate(user: BaseUser) -> bool:
    return auth_manager().is_authorized_connection(method="PUT", details=ConnectionDetails(conn_id=BUFFER_CONN_ID), user=user)


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


async def signed_in(request: Request, bearer: Bearer) -> BaseUser:
    """The user of a valid JWT, else 401: Airflow answers 403 to a forged token, but it is still no sign-in."""
    from airflow.api_fastapi.core_api.security import get_user  # see auth_manager()

    try:
        return await get_user(request, None, bearer)
    except HTTPException as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, f"sign in to Airflow first ({exc.detail})", headers={"WWW-Authenticate": "Bearer"}
        ) from None


async def reader(user: Annotated[BaseUser, Depends(signed_in)]) -> BaseUser:
    if not may_read(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{user.get_name()} may not read the {DRAIN_DAG_ID} DAG, so not its status")
    return user


async def page_reader(request: Request, bearer: Bearer) -> BaseUser:
    try:
        user = await signed_in(request, bearer)
    except HTTPException:
        raise SignInRequired(auth_manager().get_url_login(next_url=str(request.url))) from None
    if not may_read(user):
        raise PageForbidden(user)
    return user


async def operator(request: Request, bearer: Bearer, user: Annotated[BaseUser, Depends(signed_in)]) -> BaseUser:
    if not may_operate(user):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"{user.get_name()} may not requeue or discard: that needs the op or admin role"
            f" (edit access to the {BUFFER_CONN_ID} connection)",
        )
    sent = request.headers.get(CSRF_HEADER, "").encode()
    if bearer is None and not hmac.compare_digest(sent, csrf_token(user).encode()):  # signed in by the cookie
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header: reload the page and try again")
    return user


def csrf_token(user: BaseUser) -> str:
    """Stable per user, so a token refreshed by Airflow's middleware does not void an open page."""
    key = conf.get("api", "secret_key").encode()
    return hmac.new(key, f"opsync-sync-status:{user.get_id()}".encode(), hashlib.sha256).hexdigest()


Reader = Annotated[BaseUser, Depends(reader)]
PageReader = Annotated[BaseUser, Depends(page_reader)]
Operator = Annotated[BaseUser, Depends(operator)]
