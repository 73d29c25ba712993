"""Constructed measurements of a site, for the tests that judge them (``opsync.monitoring.alerts``) and the Prometheus
rules that mirror that judgement: a healthy site, and the same with one part changed or unavailable."""

from opsync.buffer.figures import BufferStats
from opsync.lsn import Lsn
from opsync.monitoring.capacity import Slot
from opsync.monitoring.status import SiteStatus
from opsync.read_model.figures import ReadModelFigures

GIB = 2**30
HEALTHY = BufferStats(
    depth=0,
    pending=0,
    oldest_age_s=0.0,
    awaiting_replica=0,
    dead_letters=0,
    used_memory=1,
    maxmemory=0,
    last_drain_s=5.0,
    last_confirm_s=5.0,
)
CAUGHT_UP = ReadModelFigures(poison_rows=0, poison_skipped=0, stream_age_s=0.0, changes_age_s=0.0)
PRIMARY = Lsn.parse("5/0")
STREAMING = Slot(
    "observatory", exists=True, wal_status="reserved", safe_wal_size=10 * GIB, max_keep=10 * GIB, active=True, restart_lsn=PRIMARY
)


def site_status(
    buffer: BufferStats | None = HEALTHY,
    lag_bytes: int = 0,
    replay_age_s: float | None = 1.0,
    read_model: ReadModelFigures = CAUGHT_UP,
    slot: Slot | None = STREAMING,
    **unavailable: str,
) -> SiteStatus:
    """What ``opsync.monitoring.status`` would measure; each part named in ``unavailable`` (redis, primary, replica) is down."""
    s = SiteStatus(
        at="2026-12-07T03:00:00+00:00", buffer=buffer, unavailable=unavailable, read_model=read_model if buffer else ReadModelFigures()
    )
    if "primary" not in unavailable:
        s.primary_lsn, s.slot = PRIMARY, slot
    if "replica" not in unavailable:
        s.replica_lsn, s.lag_from, s.replay_age_s = Lsn(PRIMARY - lag_bytes), "replica", replay_age_s
    elif s.slot:  # as opsync.monitoring.status.measure_replication: the slot's confirmed position stands in
        s.replica_lsn, s.lag_from = s.slot.restart_lsn, "slot"
    return s
