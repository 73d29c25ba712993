"""From what a script sends to a concrete, validated transaction envelope.

Validation runs here, at the site, with the models the registry derives from the schema: what the
primary would refuse for a type, a length, a missing field or a CHECK rule is refused at once
with the field named, instead of being dead-lettered hours later. Keys of new rows are generated
here (UUIDv7) and references between steps are resolved, so the envelope is final.
"""

import asyncio
import math
import re
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from opsync import apply, registry
from opsync.buffer import AsyncEnqueuer, Buffer, tables_field
from opsync.config import Settings
from opsync.envelope import Op, State, Step, Transaction
from opsync.existence import enqueue_existing
from opsync.ids import new_id
from opsync.lsn import Lsn

REF = "$ref"
MAX_JSON_DEPTH = Settings.model_fields["max_json_depth"].default
NUL = "\x00"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\\ud800" escapes decode to these when unpaired


class StepIn(BaseModel):
    """One step as a client writes it; a misspelt key is refused, not silently dropped."""

    model_config = ConfigDict(extra="forbid")

    op: Op = Op.insert
    table: str
    id: UUID | None = Field(None, description="Row key: generated for inserts when absent; required otherwise")
    ref: str | None = Field(None, description='Name later steps use as {"$ref": name} for this row\'s key')
    values: dict[str, Any] = Field(default_factory=dict)


class Invalid(Exception):
    """The request cannot be buffered; ``errors`` name each problem's location, as FastAPI does."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def problem(loc: tuple, msg: str, kind: str = "value_error") -> dict:
    return {"loc": list(loc), "msg": msg, "type": kind}


def build_transaction(
    steps: list[StepIn], site: str, idempotency_key: str | None = None, max_json_depth: int = MAX_JSON_DEPTH
) -> Transaction:
    refs: dict[str, UUID] = {}
    built, errors = [], []
    for index, step_in in enumerate(steps):
        loc = ("steps", index)
        try:
            step = build_step(step_in, refs, loc, max_json_depth)
        except Invalid as exc:
            errors += exc.errors
            continue
        if step_in.ref:
            refs[step_in.ref] = step.key
        built.append(step)
    if not steps:
        errors.append(problem(("steps",), "a transaction needs at least one step"))
    if not errors:
        errors = mixed_modes(built)
    if errors:
        raise Invalid(errors)
    return Transaction(
        txn_id=new_id(), site=site, accepted_at=datetime.now(UTC),
        idempotency_key=idempotency_key, steps=built,
    )


def mixed_modes(steps: list[Step]) -> list[dict]:
    """Critical tables are always buffered and direct ones are written at once: one transaction can't be both."""
    modes = {registry.get_table(step.table).mode for step in steps}
    if len(modes) > 1:
        return [problem(("steps",), "a transaction cannot mix buffered (critical) and direct tables")]
    return []


def build_step(step_in: StepIn, refs: dict[str, UUID], loc: tuple, max_json_depth: int) -> Step:
    try:
        entry = registry.get_table(step_in.table)
    except registry.UnknownTable as exc:
        raise Invalid([problem((*loc, "table"), str(exc))]) from None
    values = resolve_refs(step_in.values, refs, (*loc, "values"))
    if step_in.op in (Op.insert, Op.upsert):
        key = step_in.id or new_id()
        defaults = entry.insert_defaults if step_in.op is Op.insert else {}
        values = validated(entry.create_model, {**defaults, **values, "id": key}, (*loc, "values"), max_json_depth)
        values.pop("id")
        return Step(op=step_in.op, table=entry.name, key=key, values=values)
    if step_in.id is None:
        raise Invalid([problem((*loc, "id"), f"{step_in.op} needs the id of the row")])
    if step_in.op is Op.delete:
        if step_in.values:
            raise Invalid([problem((*loc, "values"), "a delete takes no values")])
        if not entry.deletable:
            raise Invalid([problem((*loc, "op"), f"rows of {entry.name} cannot be deleted")])
        return Step(op=Op.delete, table=entry.name, key=step_in.id)
    values = validated(entry.update_model, values, (*loc, "values"), max_json_depth)
    if not values:
        raise Invalid([problem((*loc, "values"), "an update needs at least one field")])
    return Step(op=Op.update, table=entry.name, key=step_in.id, values=values)


def resolve_refs(values: dict[str, Any], refs: dict[str, UUID], loc: tuple) -> dict[str, Any]:
    """Replace ``{"$ref": name}`` by the key of the earlier step named ``name``."""
    resolved = {}
    for field, value in values.items():
        if isinstance(value, dict) and set(value) == {REF}:
            if not isinstance(value[REF], str):
                raise Invalid([problem((*loc, field, REF), "a reference is the name (a string) of an earlier step", "string_type")])
            if value[REF] not in refs:
                raise Invalid([problem((*loc, field), f"reference {value[REF]!r} names no earlier step")])
            value = refs[value[REF]]
        resolved[field] = value
    return resolved


def validated(model: type[BaseModel], values: dict[str, Any], loc: tuple, max_json_depth: int) -> dict[str, Any]:
    """Values as JSON-ready data, only those the client set (database defaults must still apply).

    What cannot be stored is looked for in the values as sent: validation would quietly turn an
    unpaired surrogate in a JSON key into replacement characters.
    """
    errors = unstorable(values, loc, max_json_depth)
    try:
        dumped = model.model_validate(values).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        errors += [problem((*loc, *e["loc"]), e["msg"], e["type"]) for e in exc.errors(include_url=False)]
    if errors:
        raise Invalid(errors)
    return dumped


def unstorable(values: dict[str, Any], loc: tuple, max_depth: int) -> list[dict]:
    """Problems no column type shows: PostgreSQL text and jsonb cannot hold NUL or an unpaired UTF-16
    surrogate (not Unicode at all), and the drainer's JSON has no NaN or Infinity (they would arrive
    as null), so the primary would dead-letter the row hours later or store something else; and
    JSON deeper than ``max_depth`` costs every reader."""
    errors: list[dict] = []
    for field, value in values.items():
        _walk(value, (*loc, field), 0, max_depth, errors)
    return errors


def _walk(value: Any, where: tuple, depth: int, max_depth: int, errors: list[dict]) -> None:
    """:func:`unstorable` for one value and what it holds. A module function, not a closure: a nested
    function that calls itself is a reference cycle, garbage only the collector frees, and one per
    request made the API's worker stop for collections many times a minute."""
    if isinstance(value, str):
        if NUL in value:
            errors.append(problem(where, "contains a NUL character (\\u0000), which PostgreSQL cannot store"))
        if LONE_SURROGATE.search(value):
            errors.append(problem(where, "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode"))
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(problem(where, "not a finite number: JSON has no NaN or Infinity, and PostgreSQL's jsonb neither"))
    elif isinstance(value, dict | list):
        if depth >= max_depth:
            errors.append(problem(where, f"JSON nested too deeply: at most {max_depth} levels"))
            return
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and NUL in key:
                errors.append(problem((*where, key), "key contains a NUL character (\\u0000), which PostgreSQL cannot store"))
            if isinstance(key, str) and LONE_SURROGATE.search(key):
                key = key.encode("utf-8", "backslashreplace").decode()  # escaped: the answer cannot carry it
                errors.append(problem((*where, key), "key contains an unpaired UTF-16 surrogate, which is not Unicode"))
            _walk(item, (*where, key), depth + 1, max_depth, errors)


class PrimaryUnavailable(Exception):
    """A direct write found the primary unreachable; nothing was written (answer 503)."""


class Rejected(Exception):
    """The primary refused a direct write (constraint, missing row); nothing was written (answer 409)."""


def buffered(txn: Transaction) -> bool:
    """Critical tables are buffered; direct ones (rare planning edits) go straight to the primary."""
    return registry.get_table(txn.steps[0].table).mode is registry.Mode.critical


def answer(txn: Transaction, state: State, **fields: str) -> dict:
    """The API's answer to a write (stored with it for idempotent retries): where it is, its rows' keys."""
    return {
        "txn_id": str(txn.txn_id), "ids": [str(step.key) for step in txn.steps],
        "state": state, "accepted_at": txn.accepted_at.isoformat(), **fields,
    }


async def submit(
    txn: Transaction, enqueuer: AsyncEnqueuer, primary: Engine, idempotency: tuple[str, str] | None, body_hash: str,
    replica: Engine,
) -> tuple[dict, bool]:
    """Buffer (critical tables) or write at once (direct tables); returns (answer, replayed).

    Critical transactions take one atomic Redis step, durable before this returns, awaited on the
    event loop (updates and deletes of rows not buffered also ask the ``replica``, see
    :mod:`opsync.existence`). Direct ones block on the primary, so they run in a thread.
    """
    if buffered(txn):
        enqueued = await enqueue_existing(enqueuer, replica, txn, answer(txn, State.accepted), idempotency, body_hash)
        return enqueued.response, enqueued.replayed
    return await asyncio.to_thread(write_direct, txn, enqueuer.buffer, primary, idempotency, body_hash)


def write_direct(
    txn: Transaction, buffer: Buffer, primary: Engine, idempotency: tuple[str, str] | None, body_hash: str
) -> tuple[dict, bool]:
    """Commit a direct table's transaction in the primary with short timeouts; returns (answer, replayed).

    Its idempotency record is written after the commit, so a crash in between can make a retry
    write again: direct tables are rare planning edits, and a retry of an insert fails on its
    unique constraints rather than duplicating.
    """
    if idempotency and (previous := buffer.replay(idempotency, body_hash)) is not None:
        return previous, True
    try:
        lsn = apply.commit(primary, txn)
    except OperationalError as exc:
        raise PrimaryUnavailable(f"primary unreachable: {exc.orig.__class__.__name__}") from None
    except (IntegrityError, DataError) as exc:
        raise Rejected(str(exc.orig).strip().splitlines()[0]) from None
    except apply.RowNotFound as exc:
        raise Rejected(str(exc)) from None
    committed_at = datetime.now(UTC).isoformat()
    buffer.mark_committed(txn.txn_id, Lsn.parse(lsn), committed_at, accepted_at=txn.accepted_at.isoformat(), tables=tables_field(txn))
    committed = answer(txn, State.committed, commit_lsn=lsn)
    if idempotency:
        buffer.remember(idempotency, body_hash, committed)
    return committed, False
