"""The merged view: rows as the replica holds them, overlaid with what is still buffered.

Newest wins: a buffered insert shows a row the replica does not have yet, a buffered update
changes the fields it sets, a buffered delete hides the row. Every row says how far it has
travelled (``_sync_state``). A failed transaction never reached the primary, so where it wrote last
the replica's row shows as it is; only a row the replica does not have shows the failed values, as
``failed``, until an operator discards the transaction (or requeues it). Lookups use the overlay's indexes (see :mod:`opsync.buffer`), never
a scan of the buffer, so a query costs the same with 100,000 rows buffered as with none.
"""

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python
from sqlalchemy import Engine, any_, literal, select
from sqlalchemy.dialects.postgresql import ARRAY

from opsync.buffer import Buffer
from opsync.envelope import State
from opsync.registry import Ingestible, python_type

ROW_STATE = {State.accepted: "buffered"}  # a row is "buffered" while its transaction is "accepted"


class UnknownFilter(ValueError):
    """A filter on a column the merged view cannot filter on (not indexed), or with a bad value."""


@dataclass
class Overlay:
    values: dict[str, Any]
    txn_id: str  # of the latest change
    partial: bool
    deleted: bool
    creates: bool = False  # an upsert: the row stands without the replica's
    state: str | None = None  # of ``txn_id``
    commit_lsn: str | None = None

    @property
    def failed(self) -> bool:
        """A final status outlives the overlay only when failed (a replicated one's overlay is released),
        so a status gone after its retention is a failed one's too."""
        return self.state in (State.failed, None)

    @property
    def needs_base(self) -> bool:
        """Whether the replica's row matters here: the rest of an updated row, or all of one a failed write left alone."""
        return self.failed or (self.partial and not self.deleted)


def parse_filters(entry: Ingestible, raw: dict[str, str]) -> dict[str, Any]:
    """Query-string values typed by their column, so they compare equal to stored ones."""
    filters = {}
    for field, text in raw.items():
        if field not in entry.filterable:
            raise UnknownFilter(f"cannot filter {entry.name} on {field!r}; filterable: {', '.join(entry.filterable)}")
        if "\x00" in text:  # PostgreSQL refuses it in a query, and no stored value holds one
            raise UnknownFilter(f"{field}: contains a NUL character (\\u0000), which no stored value can")
        try:
            value = TypeAdapter(python_type(entry.table.c[field])).validate_python(text)
        except ValueError as exc:
            raise UnknownFilter(f"{field}: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
        filters[field] = to_jsonable_python(value)
    return filters


def get_row(buffer: Buffer, replica: Engine, entry: Ingestible, key: UUID | str) -> dict | None:
    overlay = read_overlays(buffer, entry, [str(key)]).get(str(key))
    base = None
    if overlay is None or overlay.needs_base:
        base = replica_rows(replica, entry, {}, ids=[key]).get(str(key))
    rows = merge_all({str(key): base} if base else {}, {str(key): overlay} if overlay else {}, {}, entry.key.name)
    return rows[0] if rows else None


def list_rows(
    buffer: Buffer, replica: Engine, entry: Ingestible, filters: dict[str, Any], after: UUID | str | None, limit: int
) -> tuple[list[dict], str | None]:
    """One page ordered by key (UUIDv7: by creation time; a natural key: by its text's bytes), and the cursor of the next page.

    Three sources each give their first ``limit`` candidates past the cursor: buffered rows
    matching the filters by index, replica rows matching them, and partial overlays (updates of
    replica rows, which may move a row into the filter). A source that filled its ``limit`` has
    been read only up to its last key, so the page stops there (the boundary): nothing past it is
    known to be complete. Rows can drop out after merging, so a page may be short, even empty,
    while ``next`` still says where to go on.
    """
    indexed = overlay_candidates(buffer, entry, filters, after, limit)
    base = replica_rows(replica, entry, filters, after=after, limit=limit)
    partial, partial_end = partial_candidates(buffer, replica, entry, filters, after, limit) if filters else ({}, None)
    ends = [keys[-1] for keys in (indexed, sorted(base)) if len(keys) >= limit] + [partial_end] * (partial_end is not None)
    boundary = min(ends) if ends else None  # type: ignore[type-var]  # partial_end only when not None
    overlays = read_overlays(buffer, entry, sorted(set(indexed) | set(base)))
    missing = [entry.key_of(k) for k, o in overlays.items() if o.needs_base and k not in base]
    base |= replica_rows(replica, entry, {}, ids=missing)
    key = entry.key.name
    rows = {row[key]: row for row in merge_all(base, overlays, filters, key)} | partial
    page = [rows[k] for k in sorted(rows) if boundary is None or k <= boundary][:limit]
    if len(page) == limit:
        return page, page[-1][key]
    return page, boundary


def partial_candidates(
    buffer: Buffer, replica: Engine, entry: Ingestible, filters: dict, after: UUID | str | None, limit: int
) -> tuple[dict[str, dict], str | None]:
    """Merged rows from partial overlays that match ``filters``, walking them in key order.

    Returns the matches and, when ``limit`` were found, the last key examined (the boundary).
    Partial overlays are the updates of rows already replicated, few next to buffered inserts.
    """
    found: dict[str, dict] = {}
    start = str(after) if after else None
    while len(found) < limit:
        chunk = buffer.index_range(buffer.partial_index(entry.name), start, limit)
        if not chunk:
            return found, None
        overlays = read_overlays(buffer, entry, chunk)
        base = replica_rows(replica, entry, {}, ids=[entry.key_of(k) for k in chunk])
        found |= {row[entry.key.name]: row for row in merge_all(base, overlays, filters, entry.key.name)}
        start = chunk[-1]
    return found, start


def overlay_candidates(buffer: Buffer, entry: Ingestible, filters: dict, after: UUID | str | None, limit: int) -> list[str]:
    """Keys of buffered rows past ``after`` whose buffered values match, walking the smallest index."""
    indexes = [buffer.field_index(entry.name, f, v) for f, v in filters.items()] or [buffer.rows_index(entry.name)]
    start = str(after) if after else None
    if len(indexes) == 1:
        return buffer.index_range(indexes[0], start, limit)
    smallest, *others = sorted(indexes, key=buffer.index_buckets)
    found: list[str] = []
    while len(found) < limit:
        chunk = buffer.index_range(smallest, start, limit)
        if not chunk:
            break
        present = [buffer.index_contains(index, chunk) for index in others]
        found += [k for i, k in enumerate(chunk) if all(p[i] for p in present)]
        start = chunk[-1]
    return found[:limit]


def read_overlays(buffer: Buffer, entry: Ingestible, keys: list[str]) -> dict[str, Overlay]:
    """The overlay rows of ``keys`` that have one, with their latest transaction's state: two round trips."""
    overlays = {
        key: Overlay(row.values, row.txn_id, row.partial, row.deleted, row.creates)
        for key, row in buffer.overlay_rows(entry.name, keys).items()
    }
    states = txn_states(buffer, {o.txn_id for o in overlays.values()})
    for overlay in overlays.values():
        overlay.state, overlay.commit_lsn = states[overlay.txn_id]
    return overlays


def replica_rows(
    replica: Engine,
    entry: Ingestible,
    filters: dict,
    ids: list[UUID | str] | None = None,
    after: UUID | str | None = None,
    limit: int | None = None,
) -> dict[str, dict]:
    """Rows as the replica holds them, JSON-ready, by key (empty without a query to make).

    Keys go as one array parameter (``key = ANY(:ids)``): an IN list of 10,000 placeholders costs
    more to build and parse than the rows it fetches. Rows fetched by key come unordered (the caller
    keys them; a sort is time for nothing); a page (``after``, ``limit``) comes in key order.
    """
    if ids == []:
        return {}
    table, key = entry.table, entry.key
    query = select(table).where(*(table.c[f] == v for f, v in filters.items()))
    if ids is None or limit is not None:
        query = query.order_by(entry.key_order)
    if ids is not None:
        query = query.where(key == any_(literal(ids, ARRAY(key.type))))
    if after is not None:
        query = query.where(entry.key_order > after)
    if limit is not None:
        query = query.limit(limit)
    with replica.connect() as conn:
        rows = [to_jsonable_python(dict(row._mapping)) for row in conn.execute(query)]
    return {row[key.name]: row for row in rows}


def merge_all(base: dict[str, dict], overlays: dict[str, Overlay], filters: dict, key_column: str) -> list[dict]:
    """Overlay each row on its replica version, drop deleted and no-longer-matching rows, sort by key."""
    merged = []
    for key in sorted(set(base) | set(overlays)):
        row = merge_one(key, base.get(key), overlays.get(key), key_column)
        if row is not None and all(row.get(f) == v for f, v in filters.items()):
            merged.append(row)
    return merged


def merge_one(key: str, base: dict | None, overlay: Overlay | None, key_column: str) -> dict | None:
    """One key's row, None when it shows no row.

    Where a failed transaction wrote last, the replica's row stands as it is; without one, a row the
    failed transaction created shows as ``failed`` (a failed update of a row nobody has shows nothing).
    Otherwise a delete hides the row, and an update needs the replica's row under it: an update of a
    row that exists nowhere is not a row.
    """
    replicated = {"_sync_state": State.replicated, "_txn_id": None, "_commit_lsn": None}
    if overlay is None or (overlay.failed and base is not None):
        return None if base is None else base | replicated
    if overlay.failed:
        if overlay.partial and not overlay.creates:
            return None
    elif overlay.deleted or (overlay.partial and base is None and not overlay.creates):
        return None
    state = State.failed if overlay.failed else overlay.state
    meta = {key_column: key, "_sync_state": ROW_STATE.get(state, state), "_txn_id": overlay.txn_id, "_commit_lsn": overlay.commit_lsn}  # type: ignore[call-overload]  # state None: unknown, kept
    return (base or {}) | overlay.values | meta


def txn_states(buffer: Buffer, txn_ids: set[str]) -> dict[str, tuple[str | None, str | None]]:
    ids = sorted(txn_ids)
    return {
        txn_id: (status["state"], status.get("commit_lsn")) if status else (None, None)
        for txn_id, status in zip(ids, buffer.statuses(ids), strict=True)
    }
