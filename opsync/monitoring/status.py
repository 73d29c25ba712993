"""How the site is doing, in one measurement: the buffer, the dead letters, how far the replica lags, and the
read model's poison rows and freshness (:mod:`opsync.read_model.figures`).

Shared by ``opsync status`` and the Airflow UI. Each part (Redis, the primary, the replica) is
measured on its own and an unreachable one is reported, never raised, so the others still show:
at the observatory the primary is often out of reach while the buffer and the replica are not.

Replica lag in bytes is the primary's current WAL position minus the replica's replay position
(the primary is read first, so a caught-up replica shows 0, never less). While the replica is down
the primary's replication slot tells the last position the replica confirmed, so the lag still
shows. Lag in seconds is 0 when caught up, else the time since the replica replayed its last
transaction; it is an upper bound when the primary cannot be asked.

The same measurement forecasts the high-water mark and the drain's ETA, and reads the slot's WAL reserve
(:mod:`opsync.monitoring.capacity`).
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from opsync.buffer import Buffer
from opsync.buffer.figures import BufferStats, buffer_stats
from opsync.config import Settings, get_settings
from opsync.errors import one_line
from opsync.lsn import Lsn, ReplicaError, replay_position
from opsync.monitoring.capacity import Capacity, Slot, capacity, replication_slot
from opsync.read_model.figures import ReadModelFigures, read_model_figures

REPLICA_SQL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
)


@dataclass
class SiteStatus:
    at: str
    buffer: BufferStats | None = None  # None when Redis is unavailable
    primary_lsn: Lsn | None = None
    replica_lsn: Lsn | None = None  # replayed; the slot's confirmed position when the replica is down
    lag_from: str | None = None  # "replica" or "slot": where replica_lsn comes from
    replay_age_s: float | None = None  # since the replica replayed its last transaction
    unavailable: dict[str, str] = field(default_factory=dict)  # part ("redis", "primary", "replica") -> why
    read_model: ReadModelFigures = field(default_factory=ReadModelFigures)  # poison rows skipped, freshness
    capacity: Capacity | None = None  # None when Redis is unavailable
    slot: Slot | None = None  # the replica's slot on the primary; None when the primary is unavailable

    @property
    def degraded(self) -> bool:
        return bool(self.unavailable)

    @property
    def lag_bytes(self) -> int | None:
        if self.primary_lsn is None or self.replica_lsn is None:
            return None
        return max(0, self.primary_lsn - self.replica_lsn)

    @property
    def lag_s(self) -> float | None:
        if self.lag_bytes == 0:
            return 0.0
        return self.replay_age_s if self.lag_from == "replica" else None

    def as_json(self) -> dict:
        b = self.buffer
        return {
            "at": self.at,
            "degraded": self.degraded,
            "buffer": b
            and {
                "depth": b.depth,
                "pending": b.pending,
                "oldest_age_s": b.oldest_age_s,
                "committed_not_replicated": b.awaiting_replica,
                "dead_letters": b.dead_letters,
                "last_drain_s": b.last_drain_s,
                "last_confirm_s": b.last_confirm_s,
            },
            "replica": {
                "primary_lsn": self.primary_lsn and str(self.primary_lsn),
                "replica_lsn": self.replica_lsn and str(self.replica_lsn),
                "lag_from": self.lag_from,
                "lag_bytes": self.lag_bytes,
                "lag_s": self.lag_s,
                "slot": self.slot and self.slot.as_json(),
            },
            "capacity": self.capacity and self.capacity.as_json(),
            "read_model": self.read_model.as_json(),
            "unavailable": self.unavailable,
        }


def site_status(buffer: Buffer, primary: Engine, replica: Engine, slot: str, settings: Settings | None = None) -> SiteStatus:
    """Measure every part; ``slot`` is the replica's replication slot on the primary (named after the site)."""
    status = SiteStatus(at=datetime.now(UTC).isoformat())
    try:
        status.buffer = buffer_stats(buffer.client, buffer)
        status.capacity = capacity(buffer, settings or get_settings())
    except redis.RedisError as exc:
        status.unavailable["redis"] = one_line(exc)
    measure_replication(status, primary, replica, slot)
    if "redis" not in status.unavailable:  # else it would wait through redis-py's retries again
        status.read_model = read_model_figures(buffer, replica)
    return status


def measure_replication(status: SiteStatus, primary: Engine, replica: Engine, slot: str) -> None:
    """The lag and the slot (also what ``/metrics`` exports): while the replica is down, the position its slot
    confirmed stands in for its replay position."""
    slot_lsn = measure_primary(status, primary, slot)
    measure_replica(status, replica)
    if status.replica_lsn is None and slot_lsn is not None:
        status.replica_lsn, status.lag_from = slot_lsn, "slot"


def measure_primary(status: SiteStatus, primary: Engine, slot: str) -> Lsn | None:
    """The primary's position, and the slot's: one query, as the primary may be a WAN away."""
    try:
        with primary.connect() as conn:
            status.slot = replication_slot(conn, slot)
            status.primary_lsn = status.slot.primary_lsn
    except DBAPIError as exc:
        status.unavailable["primary"] = one_line(exc.orig or exc)
        return None
    return status.slot.restart_lsn


def measure_replica(status: SiteStatus, replica: Engine) -> None:
    try:
        with replica.connect() as conn:
            in_recovery, replay_lsn, age = conn.execute(text(REPLICA_SQL)).one()
        status.replica_lsn = replay_position(in_recovery, replay_lsn)
    except DBAPIError as exc:
        status.unavailable["replica"] = one_line(exc.orig or exc)
        return
    except ReplicaError as exc:
        status.unavailable["replica"] = str(exc)
        return
    status.lag_from, status.replay_age_s = "replica", age and max(0.0, age)
