"""The read model's own figures, kept in the site buffer's Redis: rows the publisher skips, and how far behind it is.

The publisher runs inside Datasette (or alone); what it knows must reach ``opsync status``, the
Airflow page, the alert rules and the ingest API's ``/metrics``, which all read the buffer's Redis
and the local replica. So the publisher keeps a few small keys under the buffer's prefix:

- ``Keys.publisher_figures``, a hash: the last stream entry it published (``stream``), its change
  capture position (``changes``, ``xid:seq``) and ``skipped``, how many times a row became poison;
- ``Keys.publisher_poison``, a hash of the rows it skips now (``table key`` -> JSON of the table,
  key, duty and reason), at most :data:`POISON_KEEP` of them, the newest kept.

**Freshness** is the age of the oldest change the read model does not show yet: the larger of the
age (by Redis' clock) of the first buffer stream entry past the publisher's stream position, and the
age (by the replica's clock, from ``row_change.changed_at``, the start of the writing transaction)
of the first final change past its change position. Each is 0 when nothing waits, so freshness is 0
when the publisher is caught up, and it grows while the publisher is stuck or down, since readers
measure it from positions, not from the publisher's word. A part that cannot be measured (Redis or
the replica unreachable, no position saved yet) is left out; with neither, freshness is unknown.
"""

import json
from dataclasses import asdict, dataclass, field

import redis
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from opsync.buffer import Buffer
from opsync.errors import one_line

POISON_KEEP = 1000  # rows skipped that are listed by key; more are still counted
RECENT = 5  # the latest poison rows shown with the figures
# The first final change past a position, in the change capture's (primary key) order: one index probe
CHANGES_AGE_SQL = text(
    "SELECT greatest(0, extract(epoch FROM now() - changed_at))::float8 FROM row_change"
    " WHERE xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint AND (xid, seq) > (:xid, :seq)"
    " ORDER BY xid, seq LIMIT 1"
)


@dataclass(frozen=True)
class Poison:
    """A row the publisher skips: it could not render or write it. ``reason`` is the error in one line, never the row."""

    table: str
    key: str
    duty: str  # which publisher duty met it: replica changes, buffer, state events, sweep, replay, full load
    reason: str
    at: str  # UTC, ISO: when it became poison


@dataclass(frozen=True)
class ReadModelFigures:
    poison_rows: int | None = None  # rows skipped now; None: Redis unreachable
    poison_skipped: int | None = None  # times a row became poison, ever (a counter)
    recent: list[Poison] = field(default_factory=list)  # the latest few, newest first
    stream_age_s: float | None = None  # of the first buffer entry not yet published; 0: none
    changes_age_s: float | None = None  # of the first replica change not yet published; 0: none
    unavailable: dict[str, str] = field(default_factory=dict)  # part -> why it could not be measured

    @property
    def freshness_s(self) -> float | None:
        """Age of the oldest change not yet published: 0 when caught up, None when neither part is known."""
        known = [age for age in (self.stream_age_s, self.changes_age_s) if age is not None]
        return max(known) if known else None

    def as_json(self) -> dict:
        return {
            "freshness_s": self.freshness_s,
            "stream_age_s": self.stream_age_s,
            "changes_age_s": self.changes_age_s,
            "poison_rows": self.poison_rows,
            "poison_skipped": self.poison_skipped,
            "recent_poison": [asdict(p) for p in self.recent],
            "unavailable": self.unavailable,
        }


def publisher_key(buffer: Buffer) -> str:
    return buffer.publisher_figures


def poison_key(buffer: Buffer) -> str:
    return buffer.publisher_poison


def save_position(buffer: Buffer, name: str, value: str) -> None:
    """Mirror one of the publisher's positions (``stream`` or ``changes``), so others can measure freshness."""
    buffer.client.hset(publisher_key(buffer), name, value)


def load_poison(buffer: Buffer) -> dict[tuple[str, str], Poison]:
    return {(p.table, p.key): p for p in map(decode, buffer.client.hvals(poison_key(buffer)))}  # type: ignore[arg-type]  # bytes: no decode_responses


def store_poison(buffer: Buffer, poisoned: dict[tuple[str, str], Poison], new: int) -> None:
    """Replace the listed poison rows with ``poisoned`` (the newest :data:`POISON_KEEP`) and count ``new`` skips, atomically."""
    kept = sorted(poisoned.values(), key=lambda p: p.at)[-POISON_KEEP:]
    pipe = buffer.client.pipeline(transaction=True)
    pipe.delete(poison_key(buffer))
    if kept:
        pipe.hset(poison_key(buffer), mapping={f"{p.table} {p.key}": json.dumps(asdict(p)) for p in kept})
    if new:
        pipe.hincrby(publisher_key(buffer), "skipped", new)
    pipe.execute()


def decode(raw: bytes) -> Poison:
    return Poison(**json.loads(raw))


def read_model_figures(buffer: Buffer, replica: Engine) -> ReadModelFigures:
    """Measure every figure; an unreachable part is reported in ``unavailable``, never raised."""
    found: dict = {"unavailable": {}}
    try:
        pipe = buffer.client.pipeline(transaction=False)
        pipe.hgetall(publisher_key(buffer))
        pipe.hvals(poison_key(buffer))
        state, poison = pipe.execute()
        state = {k.decode(): v.decode() for k, v in state.items()}
        found["stream_age_s"] = buffer.unread_age(state.get("stream"))
    except redis.RedisError as exc:
        found["unavailable"]["redis"] = one_line(exc)
        return ReadModelFigures(**found)
    rows = sorted(map(decode, poison), key=lambda p: p.at, reverse=True)
    found |= {"poison_rows": len(rows), "poison_skipped": int(state.get("skipped", 0)), "recent": rows[:RECENT]}
    if "changes" not in state:
        found["unavailable"]["changes"] = "the publisher has not saved a change position yet"
        return ReadModelFigures(**found)
    xid, seq = state["changes"].split(":")
    try:
        with replica.connect() as conn:
            found["changes_age_s"] = conn.execute(CHANGES_AGE_SQL, {"xid": int(xid), "seq": int(seq)}).scalar() or 0.0
    except DBAPIError as exc:
        found["unavailable"]["replica"] = one_line(exc.orig or exc)
    return ReadModelFigures(**found)
