"""The Sync status page and its JSON, as a FastAPI app that Airflow's API server mounts at ``/opsync``.

``GET /`` is the page (server-rendered, no script from elsewhere); ``GET /api/status``,
``GET /api/dead-letters[/{txn}]`` and ``GET /api/history`` give the same data as JSON;
``POST /api/dead-letters/{txn}/requeue`` and ``/discard`` act, audited with the signed-in user's
name. Handlers are plain functions: FastAPI runs them in its thread pool, so a slow primary never
blocks the API server's event loop.
"""

from pathlib import Path as FilePath
from typing import Annotated

import redis
from airflow.sdk.exceptions import AirflowNotFoundException
from fastapi import Body, FastAPI, HTTPException, Path, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict

from opsync import dlq
from opsync.errors import one_line
from opsync_airflow.ui import page
from opsync_airflow.ui.access import CSRF_HEADER, Operator, PageForbidden, PageReader, Reader, SignInRequired, csrf_token, may_operate
from opsync_airflow.ui.site import measure, site_buffer

HERE = FilePath(__file__).parent
HISTORY_SHOWN = 20
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " form-action 'self'; base-uri 'none'; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",  # Airflow shows the page in its own frame; nobody else may (clickjacking)
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

TxnId = Annotated[
    str,
    Path(
        pattern=r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|\d{1,20}-\d{1,20})$",
        description="A txn_id, or the dead-letter entry ID of an envelope that could not be read",
    ),
]

app = FastAPI(title="opsync sync status", docs_url=None, redoc_url=None, openapi_url=None)
app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
templates = Jinja2Templates(directory=HERE / "templates")


class RequeueBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    with_dependants: bool = True  # also requeue what failed only because of it, as `opsync dlq requeue` does


@app.middleware("http")
async def security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    if not request.url.path.startswith(f"{request.scope.get('root_path', '')}/static/"):
        response.headers["Cache-Control"] = "no-store"  # figures and dead letters are live; never from a cache
    return response


@app.exception_handler(SignInRequired)
async def sign_in(request: Request, exc: SignInRequired) -> RedirectResponse:
    return RedirectResponse(exc.login_url, status.HTTP_303_SEE_OTHER)


@app.exception_handler(PageForbidden)
async def forbidden_page(request: Request, exc: PageForbidden) -> HTMLResponse:
    return templates.TemplateResponse(request, "forbidden.html", {"user": exc.user_name}, status_code=status.HTTP_403_FORBIDDEN)


@app.exception_handler(redis.RedisError)
async def buffer_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
    return JSONResponse({"detail": f"site buffer (Redis) unavailable: {one_line(exc)}"}, status.HTTP_503_SERVICE_UNAVAILABLE)


@app.exception_handler(AirflowNotFoundException)
async def connection_missing(request: Request, exc: AirflowNotFoundException) -> JSONResponse:
    return JSONResponse({"detail": f"Airflow connection missing: {exc}"}, status.HTTP_503_SERVICE_UNAVAILABLE)


@app.get("/", response_class=HTMLResponse)
def sync_status(request: Request, user: PageReader) -> HTMLResponse:
    with site_buffer() as buffer:
        snapshot = measure(buffer)
        letters, history = None, None  # unknown while Redis is unavailable (the page says so)
        if "redis" not in snapshot.status.unavailable:
            letters, history = dlq.dead_letters(buffer), dlq.history(buffer, HISTORY_SHOWN)
    page_data = {
        "user": user.get_name(),
        "can_operate": may_operate(user),
        "csrf_token": csrf_token(user),
        "csrf_header": CSRF_HEADER,
        "snapshot": snapshot,
        "figures": page.figures(snapshot),
        "chart": page.chart(snapshot.rate),
        "letters": letters and [letter.details() | {"depends_on": letter.depends_on} for letter in letters],
        "history": history,
    }
    return templates.TemplateResponse(request, "sync_status.html", page_data)


@app.get("/api/status")
def status_json(user: Reader) -> dict:
    """The figures of ``opsync status --json``, the drain rate and each figure's finding."""
    with site_buffer() as buffer:
        return measure(buffer).as_json()


@app.get("/api/dead-letters")
def dead_letters(user: Reader) -> list[dict]:
    with site_buffer() as buffer:
        return [letter.details() | {"depends_on": letter.depends_on} for letter in dlq.dead_letters(buffer)]


@app.get("/api/dead-letters/{txn}")
def dead_letter(txn: TxnId, user: Reader) -> dict:
    with site_buffer() as buffer:
        try:
            letter = dlq.find(buffer, txn)
        except dlq.UnknownTransaction as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        blocked = dlq.dependants(buffer, letter.txn_id) if letter.txn_id else []
    return letter.details() | {"depends_on": letter.depends_on, "dependants": [d.txn_id for d in blocked]}


@app.get("/api/history")
def history(user: Reader) -> list[dict]:
    """The latest requeues and discards, newest first: who, when, and why the transaction had failed."""
    with site_buffer() as buffer:
        return dlq.history(buffer, HISTORY_SHOWN)


@app.post("/api/dead-letters/{txn}/requeue")
def requeue(txn: TxnId, user: Operator, body: Annotated[RequeueBody | None, Body()] = None) -> dict:
    """Back into the buffer, with its dependants; the next drain applies it exactly once, and a second click changes nothing."""
    with site_buffer() as buffer:
        try:
            actions = dlq.requeue(buffer, txn, user.get_name(), with_dependants=(body or RequeueBody()).with_dependants)
        except dlq.UnknownTransaction as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except dlq.CannotRequeue as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return {"actions": [action.as_json() for action in actions]}


@app.post("/api/dead-letters/{txn}/discard")
def discard(txn: TxnId, user: Operator) -> dict:
    """Given up for good; what depended on it stays dead-lettered (and is named in the answer)."""
    with site_buffer() as buffer:
        try:
            action = dlq.discard(buffer, txn, user.get_name())
        except dlq.UnknownTransaction as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        blocked = dlq.dependants(buffer, action.txn_id)
    return {"actions": [action.as_json()], "still_dead_lettered": [d.txn_id for d in blocked]}
