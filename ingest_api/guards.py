"""What stands between the network and the routes: a body-size limit and a last-resort error answer.

Both are pure ASGI middleware. The size limit answers ``413`` from ``Content-Length`` before
reading anything, and stops a body without one (chunked) as soon as it passes the limit. The
last resort turns an unexpected exception into a JSON ``500`` carrying a request id; the
traceback goes to the log under that id, never into the response. A client that hangs up before
its body has arrived gets no answer and is no error.
"""

import logging
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opsync.config import get_settings

log = logging.getLogger("opsync.ingest_api")


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body larger than {limit} bytes (OPSYNC_MAX_BODY_BYTES)")


class HttpMiddleware:
    """Pure ASGI middleware for HTTP requests (cheaper than BaseHTTPMiddleware); lifespan and the rest pass through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class BodyLimit(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = get_settings().max_body_bytes
        if declared_length(scope) > limit:
            exc = too_large(limit)
            await JSONResponse({"detail": exc.detail}, exc.status_code)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit)  # FastAPI passes HTTPExceptions from body reading through
            return message

        await self.app(scope, limited_receive, send)


def declared_length(scope: Scope) -> int:
    """The Content-Length header; 0 when absent (the streaming count applies) or unreadable."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


class LastResort(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            return  # gone before its body arrived: nobody to answer, and nothing went wrong here
        except Exception:
            request_id = uuid.uuid4().hex
            log.exception("internal error in %s %s (request_id %s)", scope["method"], scope["path"], request_id)
            if started:  # too late for a 500: the server closes the connection
                raise
            body = {"detail": "internal error", "request_id": request_id}
            await JSONResponse(body, 500, headers={"X-Request-ID": request_id})(scope, receive, send)


def protect(app: FastAPI) -> None:
    """Install both; the limit runs inside the last resort so its failures are answered too."""
    app.add_middleware(BodyLimit)
    app.add_middleware(LastResort)
