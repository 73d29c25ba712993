"""The ingest endpoint the observatory's scripts write to: answers at once, whatever the link does."""

import sys
from contextlib import asynccontextmanager
from typing import Annotated

import redis
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ingest_api import events, metrics, reads, records
from ingest_api.backpressure import pressure
from ingest_api.deps import RETRY_AFTER, get_redis, warm_up
from ingest_api.errors import error
from ingest_api.guards import protect
from opsync.admission import JudgeUnavailable
from opsync.auth import ScopeError
from opsync.buffer import IdempotencyConflict, NoSuchRow
from opsync.config import get_settings
from opsync.existence import ReplicaUnavailable
from opsync.health import redis_durability
from opsync.ingest import Invalid, PrimaryUnavailable, Rejected


class NotDurable(RuntimeError):
    """Refusing to start: a 202 from this API must mean the record is on disk."""


@asynccontextmanager
async def lifespan(app: FastAPI):
    if not get_settings().allow_non_durable:
        health = redis_durability(get_redis())
        if not health.ok:
            raise NotDurable(f"site buffer is {health.detail}; set OPSYNC_ALLOW_NON_DURABLE=1 to start anyway")
    await warm_up()
    yield


app = FastAPI(
    title="opsync ingest API",
    version="1",
    description="Buffers observatory operations records durably at the site and answers at once.",
    lifespan=lifespan,
)
app.include_router(records.router)  # its routes check backpressure (records.writer)
app.include_router(reads.router)
app.include_router(events.router)
app.include_router(metrics.router)
protect(app)
app.add_middleware(metrics.RequestMetrics)  # outermost: counts the guards' answers too


ERRORS = {
    RequestValidationError: lambda exc: error(422, exc.errors()),  # FastAPI's own answer fails on input JSON cannot carry
    Invalid: lambda exc: error(422, exc.errors),
    ScopeError: lambda exc: error(403, str(exc)),
    IdempotencyConflict: lambda exc: error(409, f"Idempotency-Key {exc} was used with a different request"),
    NoSuchRow: lambda exc: error(404, str(exc)),
    ReplicaUnavailable: lambda exc: error(503, str(exc), {"Retry-After": str(get_settings().retry_after_s)}),
    Rejected: lambda exc: error(409, f"rejected by the primary: {exc}"),
    PrimaryUnavailable: lambda exc: error(503, f"{exc}; direct tables need the primary, retry later"),
    JudgeUnavailable: lambda exc: error(503, f"{exc}; retry later", {"Retry-After": str(get_settings().retry_after_s)}),
    redis.RedisError: lambda exc: error(503, f"site buffer unavailable: {exc.__class__.__name__}"),
    # noeviction: Redis refuses a script before its first write, so no transaction is half-buffered
    redis.OutOfMemoryError: lambda exc: error(503, "site buffer full (Redis maxmemory reached); retry later"),
}
for exc_class, render in ERRORS.items():
    app.add_exception_handler(exc_class, lambda request, exc, render=render: render(exc))


@app.exception_handler(HTTPException)
async def http_error(request, exc: HTTPException):
    """FastAPI's answer to a body its JSON parser gave up on is a bare "error parsing the body": say why."""
    cause = exc.__cause__
    if isinstance(cause, ClientDisconnect):
        raise cause  # nobody to tell (guards.LastResort)
    if isinstance(cause, RecursionError):
        return error(422, [body_problem(f"JSON nested too deeply: at most {get_settings().max_json_depth} levels", "json_too_deep")])
    if isinstance(cause, UnicodeDecodeError):
        return error(400, f"body: not valid UTF-8 (byte {cause.start}: {cause.reason})")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return error(422, [body_problem(f"a number has more than {sys.get_int_max_str_digits()} digits", "json_number_too_long")])
    return error(exc.status_code, exc.detail, getattr(exc, "headers", None))


def body_problem(msg: str, kind: str) -> dict:
    return {"loc": ["body"], "msg": msg, "type": kind}


class Health(BaseModel):
    status: str
    detail: str | None = None


@app.get("/healthz", response_model=Health, tags=["health"])
def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


ABOVE_HIGH_WATER = "site buffer above its high-water mark; writes are refused until it drains"


def unavailable(detail: str) -> JSONResponse:
    retry_after = {"Retry-After": str(get_settings().retry_after_s)}
    return JSONResponse(Health(status="unavailable", detail=detail).model_dump(), status_code=503, headers=retry_after)


@app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health, "headers": RETRY_AFTER}})
async def readyz(client: Annotated[redis.Redis, Depends(get_redis)]):
    """Readiness: the buffer is reachable, durable (a 202 means "on disk") and below its high-water mark,
    by the verdict the write routes use. Public, so it names the reason but no figures (``/metrics`` has them)."""
    result = await run_in_threadpool(redis_durability, client)
    if not result.ok:
        return unavailable(result.detail)
    if await pressure.current():
        return unavailable(ABOVE_HIGH_WATER)
    return Health(status="ok", detail=result.detail)
