"""Seeing an outage coming and going: how long until the buffer's high-water mark, how long until the backlog
is replicated, and how much WAL the primary still keeps for the replica.

**Rates need two readings.** The buffer keeps no history of its own, so every measurement (``opsync status``,
the Airflow page, a Prometheus scrape, the alerts DAG) also leaves a small reading in Redis, at most one per
``window / SAMPLES_PER_WINDOW`` seconds and none older than the window, and rates are taken between the oldest
reading of the window and this one. Each reading is made by one Lua script, so its counters belong to one
instant by Redis' clock: transactions ever accepted (the stream's ``entries-added``, which deletes and trims
leave alone), unsent (:attr:`Buffer.unsent`), awaiting the replica, the drain's transactions applied
(:mod:`opsync.monitoring.drain_metrics`) and ``used_memory``. No key layout beyond those counters is read.

**Bytes per transaction** is the growth of ``used_memory`` per transaction accepted, summed over the
intervals between readings in which nothing left the buffer (no acknowledgement, no confirmation, the same
Redis process): the marginal cost of buffering one more transaction, net of whatever Redis frees meanwhile
(statuses expiring after their TTL). Averages such as ``used_memory / depth`` would charge the buffer with
what finished transactions keep for days, and intervals with a drain would credit it with what the drain
freed. A figure over at least ``MIN_FILL_TXNS`` transactions is kept in Redis, so the last outage still
tells it while the drain runs.

**The forecasts.** The high-water mark is reached when either of backpressure's marks is
(:func:`opsync.stats.high_water`): ``high_water_entries`` unsent transactions, or ``used_memory`` at
``high_water_memory_fraction`` of ``maxmemory``. The transactions left before the first of them are
:func:`opsync.sizing.room` (finished transactions kept for their TTL count, as they hold memory), each at the
bytes per transaction measured here or, until that is measured, at the benchmark's figure; the time is that
room at the current ingest rate, as if nothing drained from now on: in an outage that is the countdown,
otherwise it is how long an outage starting now could last. The drain's ETA is when what waits now
(unsent plus awaiting the replica) is replicated or failed, at the rate transactions left that backlog over
the window: end to end, so a drain that commits while the replica cannot confirm is not shown as making progress.

**The slot.** PostgreSQL keeps WAL for the replica's replication slot up to ``max_slot_wal_keep_size``;
``safe_wal_size`` is how much more WAL may be written before the slot is invalidated (``wal_status`` turns
``unreserved``, then ``lost`` at the next checkpoint) and the replica must be cloned again.
"""

import math
from dataclasses import dataclass

from sqlalchemy import Connection, text

from opsync import sizing
from opsync.buffer import Buffer
from opsync.buffer.figures import Fill, capacity_reading
from opsync.config import Settings
from opsync.lsn import Lsn
from opsync.stats import high_water

SAMPLES_PER_WINDOW = 60
MIN_FILL_TXNS = 1000  # accepted while nothing drained, before bytes per transaction is trusted

SLOT_SQL = (
    "SELECT s.slot_name IS NOT NULL, s.restart_lsn::text, s.wal_status, s.safe_wal_size, coalesce(s.active, false),"
    " pg_size_bytes(current_setting('max_slot_wal_keep_size')), pg_current_wal_lsn()::text"
    " FROM (SELECT 1) AS one LEFT JOIN pg_replication_slots AS s ON s.slot_name = :slot"
)


def measure_key(buffer: Buffer) -> str:
    """The last trusted bytes per transaction: ``bytes_per_txn``, ``at`` (Redis' clock), ``txns`` it was measured over."""
    return buffer.capacity_bytes


@dataclass(frozen=True)
class Reading:
    at: float  # Redis' clock, seconds
    accepted: int  # transactions ever added to the stream
    unsent: int
    awaiting: int
    applied: int  # by the drain, as drain_metrics counts them
    used_memory: int
    run_id: str  # the Redis process: memory is not comparable across a restart

    @classmethod
    def parse(cls, raw: bytes) -> "Reading":
        at, accepted, unsent, awaiting, applied, used, run_id = raw.decode().split()
        return cls(float(at), int(accepted), int(unsent), int(awaiting), int(applied), int(used), run_id)

    @property
    def backlog(self) -> int:
        return self.unsent + self.awaiting

    @property
    def finished(self) -> int:
        """Accepted and no longer waiting: replicated, or failed."""
        return self.accepted - self.backlog


@dataclass(frozen=True)
class Forecast:
    """When something happens: ``seconds`` 0 (already), a finite time, ``math.inf`` (never at this rate)
    or None (unknown), with why in words."""

    seconds: float | None
    why: str

    @property
    def state(self) -> str:
        if self.seconds is None:
            return "unknown"
        if self.seconds == 0:
            return "now"
        return "never" if math.isinf(self.seconds) else "due"

    def describe(self) -> str:
        """For people: ``3 h 05 min (why)``, ``never (why)``, ``unknown (why)``, ``now (why)``."""
        head = duration(self.seconds) if self.state == "due" else self.state  # type: ignore[arg-type]  # "due": seconds set
        return f"{head} ({self.why})"

    def as_json(self) -> dict:
        finite = self.seconds is not None and not math.isinf(self.seconds)
        return {"seconds": self.seconds if finite else None, "state": self.state, "why": self.why}


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3 h 05 min``, ``2 d 03 h``: precise enough to act on, short enough to scan."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24:02d} h"


@dataclass(frozen=True)
class Capacity:
    span_s: float  # between the oldest reading of the window and now; 0 with one reading
    ingest_per_s: float | None  # transactions accepted; None: not measured yet
    finished_per_s: float | None  # transactions that left the backlog (replicated or failed)
    applied_per_s: float | None  # transactions the drain applied to the primary
    bytes_per_txn: float | None  # Redis memory per transaction buffered; None: not measured yet
    bytes_measured_over: int  # transactions it was measured over
    room: int  # transactions the buffer takes before a high-water mark refuses them (opsync.sizing.room)
    high_water: Forecast  # when the first of backpressure's marks is reached at the current ingest rate
    drain_eta: Forecast

    def as_json(self) -> dict:
        return {
            "span_s": self.span_s,
            "ingest_per_s": self.ingest_per_s,
            "finished_per_s": self.finished_per_s,
            "applied_per_s": self.applied_per_s,
            "bytes_per_txn": self.bytes_per_txn,
            "bytes_measured_over": self.bytes_measured_over,
            "room": self.room,
            "high_water": self.high_water.as_json(),
            "drain_eta": self.drain_eta.as_json(),
        }


def capacity(buffer: Buffer, settings: Settings) -> Capacity:
    """Read the counters (leaving a reading for later measurements) and forecast from the window's readings."""
    window = settings.capacity_window_s
    raw_now, raw_kept, maxmemory, stored = capacity_reading(buffer, window, window / SAMPLES_PER_WINDOW)
    now = Reading.parse(raw_now)
    readings = since_reset([Reading.parse(r) for r in raw_kept if r != raw_now] + [now])
    per_txn, over = fill_bytes(readings)
    if over >= MIN_FILL_TXNS:
        buffer.client.hset(measure_key(buffer), mapping={"bytes_per_txn": repr(per_txn), "at": now.at, "txns": over})
    else:
        stored = dict(zip(stored[::2], stored[1::2], strict=True))
        per_txn, over = (float(stored[b"bytes_per_txn"]), int(stored[b"txns"])) if stored else (None, 0)
    return forecast(readings, per_txn, over, int(maxmemory), settings, min_span_s=window / SAMPLES_PER_WINDOW)


def since_reset(readings: list[Reading]) -> list[Reading]:
    """The readings after the last time a counter went back (the stream or the drain's figures were reset)."""
    start = 0
    for i in range(1, len(readings)):
        if readings[i].accepted < readings[i - 1].accepted or readings[i].applied < readings[i - 1].applied:
            start = i
    return readings[start:]


def fill_bytes(readings: list[Reading]) -> tuple[float | None, int]:
    """Memory growth per transaction accepted over the intervals in which nothing left the buffer, and how many
    transactions that is."""
    grown = accepted = 0
    for a, b in zip(readings, readings[1:], strict=False):
        added = b.accepted - a.accepted
        if added > 0 and b.unsent - a.unsent == added and b.awaiting >= a.awaiting and a.run_id == b.run_id:
            grown += b.used_memory - a.used_memory
            accepted += added
    return (grown / accepted if accepted else None), accepted


def forecast(
    readings: list[Reading], bytes_per_txn: float | None, bytes_over: int, maxmemory: int, settings: Settings, min_span_s: float
) -> Capacity:
    first, now = readings[0], readings[-1]
    span = now.at - first.at
    measured = span >= min_span_s and span > 0

    def rate(count) -> float | None:
        return max(0.0, (count(now) - count(first)) / span) if measured else None

    ingest = rate(lambda r: r.accepted)
    unknown = f"measuring: rates need readings at least {min_span_s:g} s apart (have {span:.1f} s)"
    high_water, room = high_water_eta(now, ingest, bytes_per_txn, maxmemory, settings, span, unknown)
    finished = rate(lambda r: r.finished)
    return Capacity(
        span_s=span,
        ingest_per_s=ingest,
        finished_per_s=finished,
        applied_per_s=rate(lambda r: r.applied),
        bytes_per_txn=bytes_per_txn,
        bytes_measured_over=bytes_over,
        room=room,
        high_water=high_water,
        drain_eta=drain_eta(now, finished, span, unknown),
    )


def high_water_eta(
    now: Reading, ingest: float | None, measured_bytes: float | None, maxmemory: int, settings: Settings, span: float, unknown: str
) -> tuple[Forecast, int]:
    """Backpressure's own verdict says whether the mark is reached; before it, :func:`opsync.sizing.room` counts
    the transactions left (at the bytes measured here, else at the benchmark's), and the ingest rate times them."""
    fill = Fill(depth=now.unsent, used_memory=now.used_memory, maxmemory=maxmemory)
    if reason := high_water(fill, settings):
        return Forecast(0.0, f"at the high-water mark: {reason}"), 0
    per_txn = measured_bytes if measured_bytes and measured_bytes > 0 else sizing.BUFFERED_TXN_BYTES
    left = sizing.room(fill, settings, bytes_per_txn=per_txn)
    if left == 0:
        return Forecast(0.0, f"no room for one more transaction of {per_txn:,.0f} bytes under the memory mark"), 0
    if ingest is None:
        return Forecast(None, unknown), left
    if ingest == 0:
        return Forecast(math.inf, f"nothing accepted in the last {span:.0f} s ({left:,} transactions of room)"), left
    if left < settings.high_water_entries - now.unsent:
        source = "measured" if per_txn == measured_bytes else "as benchmarked"
        mark = f"the memory mark ({settings.high_water_memory_fraction:.0%} of maxmemory, {per_txn:,.0f} bytes each, {source})"
    else:
        mark = f"the entries mark ({settings.high_water_entries:,})"
    return Forecast(left / ingest, f"{left:,} transactions to {mark} at {ingest:.3g}/s"), left


def drain_eta(now: Reading, finished: float | None, span: float, unknown: str) -> Forecast:
    if now.backlog == 0:
        return Forecast(0.0, "nothing waits: no unsent transaction, none awaiting the replica")
    if finished is None:
        return Forecast(None, unknown)
    if finished == 0:
        never_ran = " (no drain has applied anything yet)" if now.applied == 0 else ""
        return Forecast(math.inf, f"nothing left the backlog ({now.backlog:,}) in the last {span:.0f} s{never_ran}")
    return Forecast(now.backlog / finished, f"{now.backlog:,} waiting, {finished:.3g}/s replicated or failed")


@dataclass(frozen=True)
class Slot:
    """The replica's replication slot on the primary, as ``pg_replication_slots`` tells it."""

    name: str
    exists: bool
    wal_status: str | None  # reserved, extended, unreserved, lost; None while it reserves no WAL
    safe_wal_size: int | None  # bytes of WAL that may still be written before the slot is lost; None: no limit, or lost
    max_keep: int | None  # max_slot_wal_keep_size in bytes; None: unlimited (-1)
    active: bool  # a replica streams through it now
    restart_lsn: Lsn | None  # the oldest WAL it keeps: what the replica confirmed
    primary_lsn: Lsn | None = None  # the primary's WAL position as it answered: replica lag is measured against it

    @property
    def safe_fraction(self) -> float | None:
        if self.safe_wal_size is None or not self.max_keep:
            return None
        return max(0.0, self.safe_wal_size / self.max_keep)

    def describe(self) -> str:
        if not self.exists:
            return "missing on the primary"
        if self.wal_status in (None, "lost"):
            return "lost: clone the replica again" if self.wal_status else "reserves no WAL yet"
        if self.max_keep is None:
            return f"{self.wal_status}, no max_slot_wal_keep_size (WAL kept without limit)"
        return (
            f"{self.wal_status}, {self.safe_wal_size:,} bytes of WAL before it is dropped"
            f" ({self.safe_fraction:.0%} of max_slot_wal_keep_size)"
        )

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "exists": self.exists,
            "wal_status": self.wal_status,
            "safe_wal_size": self.safe_wal_size,
            "max_slot_wal_keep_size": self.max_keep,
            "safe_fraction": self.safe_fraction,
            "active": self.active,
            "restart_lsn": self.restart_lsn and str(self.restart_lsn),
        }


def replication_slot(conn: Connection, name: str) -> Slot:
    """One query, on a connection the caller already holds, that also reads the primary's WAL position: the
    primary may be a WAN away."""
    exists, restart, wal_status, safe, active, keep, current = conn.execute(text(SLOT_SQL), {"slot": name}).one()
    return Slot(
        name, exists, wal_status, safe, None if keep < 0 else keep, active, Lsn.parse(restart) if restart else None, Lsn.parse(current)
    )
