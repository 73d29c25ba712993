"""Read routes: the merged view of rows (replica overlaid with what is still buffered) and states."""

from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any
from uuid import UUID

import psycopg
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from psycopg.types.datetime import TimestamptzLoader
from pydantic import BaseModel
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from ingest_api.deps import BufferDep, PrincipalDep, documented, engine_for, on_loop
from opsync import admission, merged, registry
from opsync.connections import Database
from opsync.events import visible

router = APIRouter(prefix="/v1", tags=["reads"], responses=documented(401, 403, 404, 422, 503))
RESERVED = {"limit", "after"}


@lru_cache
def get_replica() -> Engine:
    engine = engine_for(Database.replica)
    event.listen(engine, "connect", lambda connection, _: connection.adapters.register_loader("timestamptz", OutOfRangeAsText))
    return engine


class OutOfRangeAsText(TimestamptzLoader):
    """A time Python cannot hold (``infinity``, years past 9999: PostgreSQL has them, and writers at the
    main site may use them) as PostgreSQL's text, instead of an error that failed every read of the table."""

    def load(self, data) -> datetime | str:  # type: ignore[override]  # text is the point
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


ReplicaDep = Annotated[Engine, on_loop(get_replica)]


class Page(BaseModel):
    rows: list[dict[str, Any]]
    next: str | None = None


def readable(table: str, who) -> registry.Ingestible:
    try:
        entry = registry.get_table(table)
    except registry.UnknownTable as exc:
        raise HTTPException(404, str(exc)) from None
    who.require(f"read:{entry.name}")
    return entry


RowKey = Annotated[
    UUID | str,
    Path(union_mode="left_to_right", description="The row's key: a UUID, or the natural key of a table keyed by one the client gives"),
]


def path_key(entry: registry.Ingestible, given: UUID | str, where: tuple[str, str] = ("path", "row_id")) -> UUID | str:
    """``given`` as the table's key column holds it, or the 422 FastAPI gives for a bad parameter, naming it."""
    try:
        return admission.row_key(admission.rules_of(entry.name), given)
    except admission.Refused as exc:
        raise RequestValidationError([{"type": "value_error", "loc": where, "msg": str(exc), "input": str(given)}]) from None


@router.get("/records/{table}/{row_id}", summary="One row, merged")
def get_record(table: str, row_id: RowKey, buffer: BufferDep, replica: ReplicaDep, who: PrincipalDep) -> dict[str, Any]:
    """The row as it will be once everything buffered is applied, with its ``_sync_state``."""
    entry = readable(table, who)
    key = path_key(entry, row_id)
    try:
        row = merged.get_row(buffer, replica, entry, key)
    except OperationalError:
        raise HTTPException(503, "local replica unavailable") from None
    if row is None:
        raise HTTPException(404, f"no {entry.name} row {row_id}")
    return row


@router.get("/records/{table}", response_model=Page, summary="Rows, merged, filtered by column values", responses=documented(400))
def list_records(
    table: str,
    request: Request,
    buffer: BufferDep,
    replica: ReplicaDep,
    who: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[UUID | str | None, Query(union_mode="left_to_right", description="Cursor: the `next` of the previous page")] = None,
) -> Page:
    """Filter with ``?column=value`` on indexed columns (e.g. ``?status=running``); pages in key order."""
    entry = readable(table, who)
    after = None if after is None else path_key(entry, after, ("query", "after"))
    raw = {k: v for k, v in request.query_params.items() if k not in RESERVED}
    try:
        rows, cursor = merged.list_rows(buffer, replica, entry, merged.parse_filters(entry, raw), after, limit)
    except merged.UnknownFilter as exc:
        raise HTTPException(400, str(exc)) from None
    except OperationalError:
        raise HTTPException(503, "local replica unavailable") from None
    return Page(rows=rows, next=cursor)


@router.get("/transactions/{txn_id}", summary="State of a transaction")
def get_transaction(txn_id: UUID, buffer: BufferDep, who: PrincipalDep) -> dict[str, str]:
    """Only for tokens that may read or write every table it involves (its failure reason quotes row
    values); to any other it is unknown, with the same answer."""
    status = buffer.status(txn_id)
    if not visible(who, status):
        raise HTTPException(404, unknown_transaction(txn_id))
    return {"txn_id": str(txn_id), **status}  # type: ignore[dict-item]  # visible(): not None


def unknown_transaction(txn_id) -> str:
    return f"no transaction {txn_id} (unknown, or older than the status retention)"


@router.get("/transactions", summary="States of many transactions")
def get_transactions(
    buffer: BufferDep,
    who: PrincipalDep,
    ids: Annotated[list[str], Query(description="Transaction ids, repeated or comma-separated (at most 1000)")],
) -> dict[str, dict[str, str] | None]:
    """Unknown ids map to null, so a script can poll all of its transactions in one request; so do those
    the token may not see (as ``GET /v1/transactions/{txn_id}``)."""
    try:
        txn_ids = [UUID(part) for value in ids for part in value.split(",") if part.strip()]
    except ValueError:
        raise HTTPException(422, "ids: each must be a UUID") from None
    if len(txn_ids) > 1000:
        raise HTTPException(422, f"ids: at most 1000, got {len(txn_ids)}")
    statuses = (status if visible(who, status) else None for status in buffer.statuses(txn_ids))
    return dict(zip(map(str, txn_ids), statuses, strict=True))
