"""From what a script sends to a concrete, admitted transaction envelope.

Admission runs here, at the site: what the primary would refuse (each value judged as PostgreSQL's
casts would, see :mod:`opsync.admission`; NOT NULL, CHECKs; and within the transaction duplicate
keys, unique columns, references to the wrong table or to deleted rows) is refused at once with the
field named, instead of being dead-lettered hours later. Values are kept exactly as sent; each step
also carries them as the primary will store them, for readers of the buffer. Keys of new rows are
generated here (UUIDv7) and references between steps are resolved, so the envelope is final.
"""

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from opsync import admission, apply, registry
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


def either_key(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A key that is neither a UUID nor text (a number, an object) is left to admission, which knows the table's
    key kind and names it in one error (the union would give one per kind)."""
    try:
        return handler(value)
    except ValidationError:
        return value


class StepIn(BaseModel):
    """One step as a client writes it; a misspelt key is refused, not silently dropped."""

    model_config = ConfigDict(extra="forbid")

    op: Op = Op.insert
    table: str
    id: Annotated[UUID | str | None, WrapValidator(either_key)] = Field(
        None,
        union_mode="left_to_right",  # a UUID key as UUID (canonical spelling) whatever the table; text for natural keys
        description="Row key: a UUID (generated for inserts when absent if the site makes keys) or a natural key the client gives",
    )
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
    steps: list[StepIn],
    site: str,
    idempotency_key: str | None = None,
    max_json_depth: int = MAX_JSON_DEPTH,
    judge: admission.ReplicaJudge | None = None,
) -> Transaction:
    """The envelope of ``steps``, or :class:`Invalid` naming every problem the primary would refuse.

    Without ``judge``, a value only PostgreSQL can judge raises :class:`Undecided` (unless
    something else is already wrong): the caller asks again with the replica's judge, off the event loop.
    """
    txn = Admitting(judge, max_json_depth)
    built = [step for index, step_in in enumerate(steps) if (step := txn.step(step_in, ("steps", index))) is not None]
    if not steps:
        txn.errors.append(problem(("steps",), "a transaction needs at least one step"))
    if not txn.errors:
        txn.errors = mixed_modes(built)
    if txn.errors:
        raise Invalid(txn.errors)
    if txn.undecided:
        raise Undecided()
    return Transaction(
        txn_id=new_id(),
        site=site,
        accepted_at=datetime.now(UTC),
        idempotency_key=idempotency_key,
        steps=built,
    )


class Undecided(Exception):
    """A value needs PostgreSQL's verdict (see :mod:`opsync.admission`): build again with the replica's judge."""


async def admitted(
    steps: list[StepIn],
    site: str,
    idempotency_key: str | None,
    max_json_depth: int,
    judge: Callable[[], admission.ReplicaJudge],
) -> Transaction:
    """:func:`build_transaction` on the event loop; in a thread with the replica's judge only when a value needs it."""
    try:
        return build_transaction(steps, site, idempotency_key, max_json_depth)
    except Undecided:
        return await asyncio.to_thread(build_transaction, steps, site, idempotency_key, max_json_depth, judge())


def mixed_modes(steps: list[Step]) -> list[dict]:
    """Critical tables are always buffered and direct ones are written at once: one transaction can't be both."""
    modes = {registry.get_table(step.table).mode for step in steps}
    if len(modes) > 1:
        return [problem(("steps",), "a transaction cannot mix buffered (critical) and direct tables")]
    return []


@dataclass
class Row:
    """A row as the transaction's earlier steps leave it: which step last wrote it, and the values it is
    known to hold as the primary would (every column when the transaction inserted it)."""

    step: int
    values: dict[str, Any]
    deleted: bool = False


class Admitting:
    """One transaction's admission: each value judged by its column (:mod:`opsync.admission`), and what
    the steps do to each other's rows followed as the primary would see them: duplicate keys, references
    to rows of the wrong table or deleted ones, unique columns, CHECKs over the row."""

    def __init__(self, judge: admission.ReplicaJudge | None, max_json_depth: int):
        self.judge = judge
        self.max_json_depth = max_json_depth
        self.refs: dict[str, tuple[str, str]] = {}  # name -> (table, key)
        self.rows: dict[tuple[str, str], Row] = {}
        self.unique: dict[tuple, str] = {}  # (table, columns, values) -> key of the row that last took them
        self.errors: list[dict] = []
        self.undecided = False

    def step(self, step_in: StepIn, loc: tuple) -> Step | None:
        try:
            rules = admission.rules_of(step_in.table)
        except registry.UnknownTable as exc:
            self.errors.append(problem((*loc, "table"), str(exc)))
            return None
        before = len(self.errors)
        raw = self.resolve_refs(step_in.values, rules, (*loc, "values"))
        step = self.build(step_in, rules, raw, loc)
        if len(self.errors) > before or step is None:
            return None
        if step_in.ref:
            if step_in.ref in self.refs:
                self.errors.append(problem((*loc, "ref"), f"ref {step_in.ref!r} already names an earlier step"))
            self.refs[step_in.ref] = (step.table, str(step.key))
        return step

    def build(self, step_in: StepIn, rules: admission.TableRules, raw: dict, loc: tuple) -> Step | None:
        entry, op, at = rules.entry, step_in.op, loc[-1]
        if op in (Op.insert, Op.upsert):
            if step_in.id is None and entry.key_source is registry.Key.client:
                self.errors.append(problem((*loc, "id"), f"rows of {entry.name} need their key ({entry.key.name}): the client gives it"))
                return None
            uid = self.key(rules, step_in.id, (*loc, "id")) if step_in.id is not None else new_id()
            if uid is None:
                return None
            key = str(uid)
            shown = self.values(rules, raw, (*loc, "values"), partial=False)
            row = {c: None for c in rules.judges} | rules.defaults | shown
            self.follow(rules, op, key, row, at, (*loc, "id"))
            shown = rules.defaults | shown if op is Op.insert else shown
            return Step.admitted(shown, op=op, table=entry.name, key=uid, values=raw)
        if step_in.id is None:
            self.errors.append(problem((*loc, "id"), f"{op} needs the id of the row"))
            return None
        uid = self.key(rules, step_in.id, (*loc, "id"))
        if uid is None:
            return None
        key = str(uid)
        if op is Op.delete:
            if raw:
                self.errors.append(problem((*loc, "values"), "a delete takes no values"))
            if not entry.deletable:
                self.errors.append(problem((*loc, "op"), f"rows of {entry.name} cannot be deleted"))
            elif self.live(entry.name, key, (*loc, "id")):
                self.rows[(entry.name, key)] = Row(at, {}, deleted=True)
            return Step(op=Op.delete, table=entry.name, key=uid)
        shown = self.values(rules, raw, (*loc, "values"), partial=True)
        if not raw:
            self.errors.append(problem((*loc, "values"), "an update needs at least one field"))
        elif self.live(entry.name, key, (*loc, "id")):
            self.follow(rules, op, key, shown, at, (*loc, "id"))
        return Step.admitted(shown, op=op, table=entry.name, key=uid, values=raw)

    def key(self, rules: admission.TableRules, given: UUID | str, loc: tuple) -> UUID | str | None:
        """The step's key as its table's column holds it (None, the problem noted, when it cannot): a UUID table's
        as parsed by the request model (no work added), a natural key judged as sent."""
        try:
            return admission.row_key(rules, given)
        except admission.Refused as exc:
            self.errors.append(problem(loc, str(exc)))
            return None

    def live(self, table: str, key: str, loc: tuple) -> bool:
        """False (and the problem noted) when an earlier step deleted the row: the primary would find none."""
        row = self.rows.get((table, key))
        if row is not None and row.deleted:
            self.errors.append(problem(loc, f"{table} {key} was deleted by step {row.step} of this transaction"))
            return False
        return True

    def follow(self, rules: admission.TableRules, op: Op, key: str, values: dict, at: int, loc: tuple) -> None:
        """Apply the step to the transaction's picture of its rows, noting what the primary would refuse."""
        table = rules.entry.name
        earlier = self.rows.get((table, key))
        if op is Op.insert and earlier is not None and not earlier.deleted:
            self.errors.append(problem(loc, f"duplicate key: step {earlier.step} of this transaction already writes {table} {key}"))
            return
        if op is Op.update and earlier is not None:
            values = earlier.values | values
        self.check_row(rules, values, loc[:-1] + ("values",))
        self.check_unique(rules, key, values, loc[:-1] + ("values",))
        self.check_references(rules, values, loc[:-1] + ("values",))
        self.rows[(table, key)] = Row(at, values)

    def check_row(self, rules: admission.TableRules, row: dict, loc: tuple) -> None:
        for check in rules.checks:
            if not all(c in row and row[c] is not admission.UNDECIDED for c in check.columns):
                continue  # a column the transaction does not set: the primary's to check
            if check.test is not None:
                passed = check.test(row)
            elif self.judge is None:
                self.undecided = True
                continue
            else:
                passed = self.judge.holds(rules.entry.name, check, {c: row[c] for c in check.columns})
            if not passed:
                self.errors.append(problem((*loc, check.columns[0]), check.message()))

    def check_unique(self, rules: admission.TableRules, key: str, row: dict, loc: tuple) -> None:
        """Unique columns against the rows the transaction wrote before, by index: a request may hold 1,000 rows."""
        table = rules.entry.name
        for columns in rules.uniques:
            mine = tuple(row.get(c) for c in columns)
            if any(v is None or v is admission.UNDECIDED for v in mine):
                continue
            index = (table, columns, tuple(map(admission.unique_key, mine)))
            holder = self.unique.get(index)
            other = self.rows.get((table, holder)) if holder not in (None, key) else None
            if (
                other is not None
                and not other.deleted
                and all(admission.unique_key(other.values.get(c)) == v for c, v in zip(columns, index[2], strict=True))
            ):
                same = f"duplicate ({', '.join(columns)}): step {other.step} of this transaction has the same"
                self.errors.append(problem((*loc, columns[0]), same))
            else:
                self.unique[index] = key

    def check_references(self, rules: admission.TableRules, row: dict, loc: tuple) -> None:
        for column, referred in rules.foreign.items():
            target = self.rows.get((referred, row.get(column)))  # type: ignore[arg-type]  # a missing key finds no row
            if target is not None and target.deleted:
                self.errors.append(problem((*loc, column), f"refers to {referred} {row[column]}, deleted by step {target.step}"))

    def values(self, rules: admission.TableRules, raw: dict, loc: tuple, partial: bool) -> dict:
        """Each value as PostgreSQL would store it; problems noted. Inserts must give the required columns."""
        self.errors += unstorable(raw, loc, self.max_json_depth)
        shown: dict[str, Any] = {}
        for name, value in raw.items():
            judge = rules.judges.get(name)
            if judge is None:
                why = "extra inputs are not permitted" + (": the key is the step's id" if name in ("id", rules.entry.key.name) else "")
                self.errors.append(problem((*loc, name), why, "extra_forbidden"))
            elif isinstance(value, admission.Unrepresentable) or (self.errors and has_problem(self.errors, (*loc, name))):
                continue  # refused already (a NUL, a bad reference...): one problem per field is enough
            elif value is None:
                if name in rules.not_null:
                    self.errors.append(problem((*loc, name), f"{name} cannot be null (NOT NULL)"))
                shown[name] = None
            else:
                shown[name] = self.judged(rules, name, judge, value, (*loc, name))
        if not partial:
            self.errors += [problem((*loc, c), "Field required", "missing") for c in rules.required if c not in raw]
        return shown

    def judged(self, rules: admission.TableRules, name: str, judge, value: Any, loc: tuple) -> Any:
        try:
            found = judge(value)
            if found is admission.UNDECIDED and self.judge is not None:
                found = self.judge.canonical(rules.entry.name, name, value)
            elif found is admission.UNDECIDED:
                self.undecided = True
            return found
        except admission.Refused as exc:
            self.errors.append(problem(loc, str(exc)))
            return admission.UNDECIDED

    def resolve_refs(self, values: dict[str, Any], rules: admission.TableRules, loc: tuple) -> dict[str, Any]:
        """Replace ``{"$ref": name}`` by the key of the earlier step named ``name``; a foreign key's
        reference must name a step of the table it refers to."""
        resolved = {}
        for name, value in values.items():
            if isinstance(value, dict) and set(value) == {REF}:
                value = self.referred(value[REF], rules.foreign.get(name), (*loc, name))
            resolved[name] = value
        return resolved

    def referred(self, ref: Any, referred: str | None, loc: tuple) -> str | None:
        if not isinstance(ref, str):
            self.errors.append(problem(loc, "a reference is the name of an earlier step: a string"))
            return None
        if ref not in self.refs:
            self.errors.append(problem(loc, f"reference {ref!r} names no earlier step"))
            return None
        table, key = self.refs[ref]
        if referred is not None and table != referred:
            self.errors.append(problem(loc, f"reference {ref!r} names a row of {table}, but {loc[-1]} refers to {referred}"))
        return key


def has_problem(errors: list[dict], loc: tuple) -> bool:
    """Whether a problem was already noted at ``loc`` or inside it (a NUL, a surrogate...): one is enough."""
    where = list(loc)
    return any(e["loc"][: len(where)] == where for e in errors)


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
    if isinstance(value, str) and not isinstance(value, admission.Unrepresentable):
        if NUL in value:
            errors.append(problem(where, "contains a NUL character (\\u0000), which PostgreSQL cannot store"))
        if LONE_SURROGATE.search(value):
            errors.append(problem(where, "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode"))
    elif isinstance(value, admission.Unrepresentable):
        errors.append(problem(where, f"not a finite number as a double: {value} (the API and every reader read JSON numbers as doubles)"))
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
        "txn_id": str(txn.txn_id),
        "ids": [str(step.key) for step in txn.steps],
        "state": state,
        "accepted_at": txn.accepted_at.isoformat(),
        **fields,
    }


async def submit(
    txn: Transaction,
    enqueuer: AsyncEnqueuer,
    primary: Engine,
    idempotency: tuple[str, str] | None,
    body_hash: str,
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
