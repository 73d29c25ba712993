"""Dependencies of the routes: clients built once per process from the settings, and auth."""

import asyncio
import logging
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Annotated, Any, TypeVar
from weakref import WeakKeyDictionary

import hiredis
import redis
import redis.asyncio as aioredis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from opsync.admission import ReplicaJudge
from opsync.auth import AuthError, AuthUnavailable, Principal, TokenVerifier, hash_token
from opsync.buffer import AsyncEnqueuer, Buffer
from opsync.config import Settings, get_settings
from opsync.connections import Database, Timeouts, async_redis_client, engine, redis_client, request_timeouts

T = TypeVar("T")
log = logging.getLogger("opsync.ingest_api")


@lru_cache
def get_redis() -> redis.Redis:
    return redis_client(get_settings())


@lru_cache
def get_buffer() -> Buffer:
    settings = get_settings()
    return Buffer(get_redis(), idempotency_ttl_s=settings.idempotency_ttl_s, status_ttl_s=settings.status_ttl_s)


def get_enqueuer() -> AsyncEnqueuer:
    """The buffer's enqueue on an asyncio client of the running event loop (one per loop: a client's
    connections belong to the loop that opened them; tests run several loops in one process).

    No ``socket_timeout``: the enqueuer bounds each call as a whole (``answered_within``). On a
    ``rediss://`` URL the URL's TLS connection class wins over :class:`PackedConnection` (redis-py).
    """
    loop, buffer = asyncio.get_running_loop(), get_buffer()
    enqueuer = _enqueuers.get(loop)
    if enqueuer is None or enqueuer.buffer is not buffer:
        settings = get_settings()
        client = async_redis_client(settings, Timeouts(settings.redis_timeout_s), connection_class=PackedConnection)
        enqueuer = _enqueuers[loop] = AsyncEnqueuer(buffer, client, settings.redis_timeout_s)
    return enqueuer


class PackedConnection(aioredis.Connection):
    """An asyncio connection that packs commands with hiredis (C) instead of redis-py's pure Python
    packer, which its synchronous client already avoids when hiredis is installed: an enqueue has
    a few dozen arguments, and packing them was a tenth of the API's CPU per write."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD": the server wants the words apart
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


_enqueuers: WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEnqueuer] = WeakKeyDictionary()


def engine_for(database: Database) -> Engine:
    """Short timeouts: a request must never hang on the intercontinental link."""
    settings = get_settings()
    return engine(settings, database, request_timeouts(settings, database), pre_ping=True)


async def warm_up() -> None:
    """Open, before the first request, what it would otherwise open while it waits: the event loop's
    Redis connection and script, a replica connection for token checks, and what importing the
    database driver and anyio's thread support takes. A fresh worker's first write stopped its
    event loop for 50–100 ms (``make bench-ingest``). Best effort: the API starts while Redis or
    the replica is down (a replica behind a dead link delays it by the 3 s connect timeout), and
    answers 503 until they are back."""
    get_primary()
    try:
        await get_enqueuer().prepare()
    except redis.RedisError as exc:
        log.warning("site buffer unreachable at start (%s); writes answer 503 until it is back", exc.__class__.__name__)
    try:
        await run_in_threadpool(get_verifier().connect)  # as token reads run: imports anyio's thread support
    except OperationalError as exc:
        log.warning("token store unreachable at start (%s); tokens are checked once it answers", exc.orig.__class__.__name__)


@lru_cache
def get_primary() -> Engine:
    return engine_for(Database.primary)


@lru_cache
def get_verifier() -> TokenVerifier:
    """Token checks on the replica, in a pool apart from the reads' (``reads.get_replica``, which loads out-of-range times as text)."""
    return TokenVerifier(engine_for(Database.replica), get_settings().token_cache_ttl_s)


def get_judge() -> ReplicaJudge:
    """PostgreSQL's verdict on values Python cannot judge exactly, on the token checks' replica engine (and pool)."""
    return ReplicaJudge(get_verifier().engine)


TOKEN_RETRY_AFTER_S = 5  # a replica restart takes seconds


def on_loop(factory: Callable[[], T]) -> Any:
    """``factory`` as a dependency run on the event loop: a cached getter needs no worker thread.

    FastAPI runs every sync dependency in the thread pool; for getters that only return a cached
    object, those hops cost more than the request's own work (see ``make bench-ingest``).
    """

    async def dependency() -> T:
        return factory()

    return Depends(dependency)


class Caller(HTTPBearer):
    """The caller, from ``Authorization: Bearer <token>``, and the API's bearer scheme in OpenAPI.

    One dependency with no parameters but the request, reading the header itself: FastAPI solves
    each parameter and sub-dependency on every request, and at 1,000 requests per second that
    cost more than the write itself (``make bench-ingest``).
    """

    def __init__(self) -> None:
        super().__init__(auto_error=False, scheme_name="bearer", description="Authorization: Bearer <token> (opsync tokens create)")

    # HTTPBearer for its OpenAPI scheme only: this answers the principal, not the credentials
    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        return await principal(request.headers.get("authorization"))


async def principal(authorization: str | None) -> Principal:
    """The caller of this ``Authorization`` header: 401 with a challenge (RFC 6750) when it is not valid."""
    if not authorization:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    try:
        return await checked(bearer(authorization))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    except AuthUnavailable as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": str(TOKEN_RETRY_AFTER_S)}) from None


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


async def checked(token: str) -> Principal:
    """The token's principal from the cache, on the loop; its row is read in a thread only when the cache cannot answer.

    A token's row is re-read in the background once its entry is past half its TTL, so requests
    do not wait for the replica every TTL; and when one must be read, every request carrying that
    token waits for the same read (at 1,000 requests per second each used to start its own, and
    the replica's connection pool ran dry for a tenth of a second).
    """
    verifier = get_verifier()
    who, due = verifier.verify_cached(token)
    if who is None:
        return await asyncio.shield(reading(verifier, token))
    if due:
        reading(verifier, token)
    return who


def reading(verifier: TokenVerifier, token: str) -> asyncio.Future:
    """The read of ``token``'s row in progress on this loop, started if there is none."""
    digest, loop = hash_token(token), asyncio.get_running_loop()
    future = _reads.get(digest)
    if future is None or future.get_loop() is not loop:
        future = _reads[digest] = asyncio.ensure_future(run_in_threadpool(verifier.reread, token))
        future.add_done_callback(partial(_read_done, digest))
    return future


def _read_done(digest: str, future: asyncio.Future) -> None:
    if _reads.get(digest) is future:
        del _reads[digest]
    if not future.cancelled():
        future.exception()  # a background re-read's failure is the next request's, from the cache or its own read


_reads: dict[str, asyncio.Future] = {}


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
    400: "Malformed request: a body that is not UTF-8, a filter on a column that has none, or a filter value with a NUL",
    401: "Missing, malformed, unknown, expired or revoked bearer token",
    403: "The token lacks the scope this table needs",
    404: "No such table or row (or transaction: unknown, past its status retention, or of tables the token may not see)",
    409: "Idempotency-Key reused with a different request, or a direct write refused by the primary",
    413: "Request body or record list larger than the limit",
    422: "Invalid input (JSON nested too deeply included): each problem's location (field) and reason",
    503: "Site buffer, local replica or primary (direct tables) unavailable, or the buffer is above its high-water mark; "
    "retry later (Retry-After)",
}


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
"""Every ``503`` carries it (``ingest_api.errors.error``); tests/test_api_headers.py holds each route to it."""


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route can answer, so clients and fuzzers know them all."""
    return {
        code: {"model": ErrorBody, "description": ERROR_TEXT[code]} | ({"headers": RETRY_AFTER} if code == 503 else {}) for code in codes
    }


SettingsDep = Annotated[Settings, on_loop(get_settings)]
BufferDep = Annotated[Buffer, on_loop(get_buffer)]
PrincipalDep = Annotated[Principal, Depends(Caller())]
