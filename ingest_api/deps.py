"""Dependencies of the routes: clients built once per process from the settings, and auth."""

import asyncio
from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, Any, TypeVar
from weakref import WeakKeyDictionary

import redis
import redis.asyncio as aioredis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict
from redis.maint_notifications import MaintNotificationsConfig
from sqlalchemy import Engine, create_engine
from starlette.concurrency import run_in_threadpool

from opsync.auth import AuthError, AuthUnavailable, Principal, TokenVerifier
from opsync.buffer import AsyncEnqueuer, Buffer
from opsync.config import Settings, get_settings

T = TypeVar("T")


@lru_cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url.get_secret_value(), socket_timeout=5)


@lru_cache
def get_buffer() -> Buffer:
    settings = get_settings()
    return Buffer(get_redis(), idempotency_ttl_s=settings.idempotency_ttl_s, status_ttl_s=settings.status_ttl_s)


def get_enqueuer() -> AsyncEnqueuer:
    """The buffer's enqueue on an asyncio client of the running event loop (one per loop: a client's
    connections belong to the loop that opened them; tests run several loops in one process).

    Maintenance notifications are off: redis-py 8.1's asyncio pool skips its check of pooled
    connections when they are "auto", so the first write after a Redis restart would fail.
    """
    loop, buffer = asyncio.get_running_loop(), get_buffer()
    enqueuer = _enqueuers.get(loop)
    if enqueuer is None or enqueuer.buffer is not buffer:
        client = aioredis.Redis.from_url(
            get_settings().redis_url.get_secret_value(), socket_timeout=5,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        enqueuer = _enqueuers[loop] = AsyncEnqueuer(buffer, client)
    return enqueuer


_enqueuers: WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEnqueuer] = WeakKeyDictionary()


def engine_for(url: str, timeout_s: int) -> Engine:
    """Short timeouts: a request must never hang on the intercontinental link."""
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": timeout_s, "options": f"-c statement_timeout={timeout_s * 1000}"},
    )


@lru_cache
def get_primary() -> Engine:
    settings = get_settings()
    return engine_for(settings.primary_url.get_secret_value(), settings.direct_timeout_s)


@lru_cache
def get_verifier() -> TokenVerifier:
    settings = get_settings()
    return TokenVerifier(engine_for(settings.replica_url.get_secret_value(), 3), settings.token_cache_ttl_s)


TOKEN_RETRY_AFTER_S = 5  # a replica restart takes seconds


def on_loop(factory: Callable[[], T]) -> Any:
    """``factory`` as a dependency run on the event loop: a cached getter needs no worker thread.

    FastAPI runs every sync dependency in the thread pool; for getters that only return a cached
    object, those hops cost more than the request's own work (see ``make bench-ingest``).
    """

    async def dependency() -> T:
        return factory()

    return Depends(dependency)


class BearerHeader(HTTPBearer):
    """The raw ``Authorization`` header, documented in OpenAPI as the API's bearer scheme.

    Read directly rather than as a FastAPI header parameter, which costs more per request than
    the write itself at 1,000 requests per second; :func:`principal` checks it.
    """

    async def __call__(self, request: Request) -> str | None:
        return request.headers.get("authorization")


bearer = BearerHeader(auto_error=False, description="Authorization: Bearer <token> (opsync tokens create)")


async def principal(authorization: Annotated[str | None, Depends(bearer)]) -> Principal:
    """The caller, from ``Authorization: Bearer <token>``: 401 with a challenge (RFC 6750) when it is not valid.

    A token fresh in the cache is checked on the loop; one that needs the replica, in a thread.
    """
    if not authorization:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = authorization.partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        token, verifier = token.strip(), get_verifier()
        return verifier.verify_cached(token) or await run_in_threadpool(verifier.verify, token)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    except AuthUnavailable as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": str(TOKEN_RETRY_AFTER_S)}) from None


class Problem(BaseModel):
    """One problem of a request: where (``loc``, ending with the field) and why."""

    model_config = ConfigDict(extra="allow")  # FastAPI's own validation errors add ``input`` and ``ctx``
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error answer: ``detail`` says what is wrong and names the field; invalid input lists each problem."""

    detail: str | list[Problem]


ERROR_TEXT = {
    400: "Malformed request: JSON nested deeper than the parser goes, or a filter on a column that has none",
    401: "Missing, malformed, unknown, expired or revoked bearer token",
    403: "The token lacks the scope this table needs",
    404: "No such table or row (or transaction, or its status retention is over)",
    409: "Idempotency-Key reused with a different request, or a direct write refused by the primary",
    413: "Request body or record list larger than the limit",
    422: "Invalid input: each problem's location (field) and reason",
    503: "Site buffer, local replica or primary (direct tables) unavailable, or the buffer is above its high-water mark; "
         "retry later (Retry-After)",
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route can answer, so clients and fuzzers know them all."""
    return {code: {"model": ErrorBody, "description": ERROR_TEXT[code]} for code in codes}


SettingsDep = Annotated[Settings, on_loop(get_settings)]
BufferDep = Annotated[Buffer, on_loop(get_buffer)]
PrincipalDep = Annotated[Principal, Depends(principal)]
