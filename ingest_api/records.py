"""Write routes: records of one table, multi-step transactions, updates and deletes."""

import hashlib
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import Engine

from ingest_api.backpressure import check_backpressure
from ingest_api.deps import Caller, documented, get_enqueuer, get_judge, get_primary
from ingest_api.reads import RowKey, get_replica, path_key
from opsync import domain, registry
from opsync.admission import json_float
from opsync.auth import Principal
from opsync.buffer import AsyncEnqueuer
from opsync.config import Settings, get_settings
from opsync.envelope import Op, Receipt
from opsync.ingest import Invalid, StepIn, admitted, problem, submit

IDEMPOTENCY_KEY = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 200


class ExactNumbers(Request):
    """A request whose JSON body keeps 1e-400 and 1e400 apart from 0 and infinity, as :func:`records_body` does."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=json_float)
        return self._json


class ExactNumbersRoute(APIRoute):
    """Routes whose body FastAPI parses (transactions, updates) read numbers as :class:`ExactNumbers` does."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(ExactNumbers(request.scope, request.receive))

        return route


LOCATION = {
    "Location": {
        "description": "The status URL of the accepted transaction (the receipt's `status_url`)",
        "required": True,
        "schema": {"type": "string", "format": "uri"},
    }
}
router = APIRouter(  # every route here answers 202 (:func:`accepted`)
    prefix="/v1",
    tags=["records"],
    route_class=ExactNumbersRoute,
    responses=documented(400, 401, 403, 404, 409, 413, 422, 503) | {202: {"headers": LOCATION}},
)


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, read directly (documented by ``IDEMPOTENT``): a header parameter
    is one more for FastAPI to solve on every request."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        raise RequestValidationError(
            [
                {
                    "type": "string_too_long",
                    "loc": ("header", IDEMPOTENCY_KEY.lower()),
                    "input": key,
                    "msg": f"String should have at most {MAX_IDEMPOTENCY_KEY} characters",
                }
            ]
        )
    return key


IDEMPOTENT = {
    "parameters": [
        {
            "name": IDEMPOTENCY_KEY,
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
            "description": "Retries with the same key and body return the original answer; a different body is 409",
        }
    ]
}
EXAMPLES = domain.current().examples
TableName = Annotated[str, Path(description="An ingestible table", examples=[EXAMPLES.table])]


class TransactionIn(BaseModel):
    steps: list[StepIn]

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [EXAMPLES.transaction]}}


@dataclass(frozen=True)
class Writer:
    """What a write route needs."""

    settings: Settings
    enqueuer: AsyncEnqueuer
    primary: Engine
    who: Principal
    idempotency_key: str | None
    replica: Engine


class WriteAccess(Caller):
    """A writer, from one dependency (see :class:`Caller`): the caller (401), then the idempotency key.
    Backpressure comes in :func:`run`, after the scopes: only an authorised writer learns how full the buffer is."""

    async def __call__(self, request: Request) -> Writer:  # type: ignore[override]  # see Caller
        who = await super().__call__(request)
        return Writer(get_settings(), get_enqueuer(), get_primary(), who, idempotency_key(request), get_replica())


WriterDep = Annotated[Writer, Depends(WriteAccess())]


class RecordsRoute(ExactNumbersRoute):
    """``POST /v1/records/{table}``, the hot path: its one dependency (:class:`WriteAccess`) is called
    here, not solved by FastAPI per request. Its signature still documents the route (path parameter,
    bearer scheme); solving it, for a path parameter that is any string and a dependency that takes
    only the request, was about a tenth of the API's CPU per write (``make bench-ingest``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint, access = self.endpoint, WriteAccess()

        async def route(request: Request) -> Response:
            return await endpoint(request.path_params["table"], request, await access(request))

        return route


def body_hash(request: Request, body: Any) -> str:
    """What an Idempotency-Key is bound to: the method, the path and the parsed body.

    A model is dumped only here, after validation has bounded how deep its values nest: dumped
    earlier, deeper JSON made the serialiser fail before the depth limit could answer."""
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json")
    canonical = json.dumps([request.method, request.scope["path"], body], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def accepted(receipt: Receipt) -> Response:
    """The receipt as the answer, serialised once: returning the model would make FastAPI validate and
    encode it again (``response_model`` still documents it). ``Location`` is where to follow it."""
    return Response(receipt.model_dump_json(), status_code=202, media_type="application/json", headers={"Location": receipt.status_url})


async def run(steps: list[StepIn], request: Request, w: Writer, raw_body) -> Response:
    """Check scopes and backpressure, validate and buffer on the event loop; only a direct table's write takes a thread.

    The routes are ``async`` so that FastAPI does not spend thread-pool hops on them and on
    serialising their answers: at 1,000 requests per second those hops cost more than the work.
    """
    if len(steps) > w.settings.max_steps_per_transaction:  # bounds the enqueue script's time (README "Limits")
        limit = w.settings.max_steps_per_transaction
        raise HTTPException(413, f"at most {limit} steps per transaction (OPSYNC_MAX_STEPS_PER_TRANSACTION), got {len(steps)}")
    tables = sorted({step.table for step in steps} & registry.REGISTRY.keys())
    for table in tables:
        w.who.require(f"write:{table}")  # before validation: a token without the scope learns nothing of the table's rules
    if tables:  # 503 + Retry-After above the high-water mark, to authorised writers only (naming no table is a 422)
        await check_backpressure()
    txn = await admitted(steps, w.settings.site, w.idempotency_key, w.settings.max_json_depth, get_judge)  # unknown tables: 422
    idempotency = (w.who.name, w.idempotency_key) if w.idempotency_key else None
    answer, _ = await submit(txn, w.enqueuer, w.primary, idempotency, body_hash(request, raw_body), w.replica)
    return accepted(Receipt(**answer, status_url=f"{base_url(request)}v1/transactions/{answer['txn_id']}"))


def base_url(request: Request) -> str:
    """``request.base_url``, parsed once per host and prefix rather than on every write."""
    scope, server = request.scope, request.scope.get("server")
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    return _base_url(scope.get("scheme", "http"), server and tuple(server), request.headers.get("host"), root_path)


@lru_cache(maxsize=64)
def _base_url(scheme: str, server: tuple[str, int] | None, host: str | None, root_path: str) -> str:
    headers = [(b"host", host.encode("latin-1"))] if host is not None else []
    scope = {"type": "http", "scheme": scheme, "server": server, "path": "/", "headers": headers, "root_path": root_path}
    return str(Request(scope).base_url)


RECORDS = TypeAdapter(dict[str, Any] | list[dict[str, Any]])
RECORDS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    **RECORDS.json_schema(),
                    "title": "Records",
                    "examples": [EXAMPLES.record],
                }
            }
        },
    }
}


async def post_records(table: TableName, request: Request, w: WriterDep) -> Response:
    """Buffer rows of a critical table (answers 202 at once) or write a direct table's rows."""
    records = await records_body(request)
    rows = records if isinstance(records, list) else [records]
    if len(rows) > w.settings.max_records_per_request:
        limit = w.settings.max_records_per_request
        raise HTTPException(413, f"at most {limit} records per request (OPSYNC_MAX_RECORDS_PER_REQUEST), got {len(rows)}")
    return await run(record_steps(table, rows), request, w, records)


router.add_api_route(
    "/records/{table}",
    post_records,
    methods=["POST"],
    status_code=202,
    response_model=Receipt,
    summary="Record one row or a list",
    openapi_extra={**IDEMPOTENT, **RECORDS_BODY},
    route_class_override=RecordsRoute,
)


async def records_body(request: Request) -> dict[str, Any] | list[dict[str, Any]]:
    """The body as FastAPI gives a ``dict | list[dict]`` body parameter, with the same answers to bad
    input, read here because FastAPI's way costs a MIME parser and a validator per request, about a
    twentieth of the route's CPU at 1,000 single-record requests per second (documented by ``RECORDS_BODY``)."""
    raw = await request.body()
    value = json_value(raw) if raw and is_json(request.headers.get("content-type")) else raw or None
    if value is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    if isinstance(value, dict) or (isinstance(value, list) and all(isinstance(row, dict) for row in value)):
        return value
    try:
        return RECORDS.validate_python(value)  # refuses it: what and where, as FastAPI would say
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None


def json_value(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_float=json_float)  # 1e-400 is not 0: the primary would refuse it
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}, "ctx": {"error": exc.msg}}
        raise RequestValidationError([error], body=exc.doc) from exc
    except Exception as exc:  # too deep, not UTF-8: app.http_error says which
        raise HTTPException(400, "There was an error parsing the body") from exc


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, parameters aside; no content type is not JSON."""
    maintype, _, subtype = (content_type or "").partition(";")[0].strip().lower().partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def record_steps(table: str, rows: list[dict[str, Any]]) -> list[StepIn]:
    """One insert step per row; a bad ``id`` is the client's error (422), located like the values' errors."""
    steps, errors = [], []
    for index, row in enumerate(map(dict, rows)):
        try:
            steps.append(StepIn(table=table, id=row.pop("id", None), values=row))
        except ValidationError as exc:
            errors += [problem(("steps", index, *e["loc"]), e["msg"], e["type"]) for e in exc.errors(include_url=False)]
    if errors:
        raise Invalid(errors)
    return steps


@router.post("/transactions", status_code=202, response_model=Receipt, summary="Several steps, atomically", openapi_extra=IDEMPOTENT)
async def post_transaction(
    body: TransactionIn,
    request: Request,
    w: WriterDep,
) -> Response:
    """Steps apply in order, all or nothing; a step may use ``{"$ref": name}`` for an earlier step's key."""
    return await run(body.steps, request, w, body)


def step_key(table: str, row_id: UUID | str) -> UUID | str:
    """The path's key, refused (422 naming ``row_id``) when it is none of its table's; an unknown table is admission's to name."""
    try:
        return path_key(registry.get_table(table), row_id)
    except registry.UnknownTable:
        return row_id


@router.patch("/records/{table}/{row_id}", status_code=202, response_model=Receipt, summary="Update fields", openapi_extra=IDEMPOTENT)
async def patch_record(
    table: TableName,
    row_id: RowKey,
    request: Request,
    w: WriterDep,
    values: Annotated[dict[str, Any], Body(examples=[EXAMPLES.update])],
) -> Response:
    """Works whether the row is still buffered, committed or replicated: applied after its create, in order.
    A row deleted by a buffered transaction, or that neither the buffer nor the local replica has, is 404."""
    steps = [StepIn(op=Op.update, table=table, id=step_key(table, row_id), values=values)]
    return await run(steps, request, w, values)


@router.delete("/records/{table}/{row_id}", status_code=202, response_model=Receipt, summary="Delete a row", openapi_extra=IDEMPOTENT)
async def delete_record(
    table: TableName,
    row_id: RowKey,
    request: Request,
    w: WriterDep,
) -> Response:
    steps = [StepIn(op=Op.delete, table=table, id=step_key(table, row_id))]
    return await run(steps, request, w, None)
