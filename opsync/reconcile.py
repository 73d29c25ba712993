"""The periodic safety net behind the drain: confirm what the replica has passed, take over what a
crashed drainer left claimed, and say plainly what is stuck.

The drain run's own sensor usually confirms its transactions; this pass confirms the rest (a sensor
that timed out, a run that died, a replica that came back), so no confirmation depends on one
sensor instance.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from opsync.buffer import Buffer
from opsync.buffer.figures import BufferStats, buffer_stats
from opsync.drain import CONSUMER, confirm
from opsync.lsn import Lsn, ReplicaError


@dataclass(frozen=True)
class Reconciliation:
    reclaimed: int  # entries taken over from consumers idle past the limit
    confirmed: int  # transactions marked replicated by this pass
    stats: BufferStats  # after confirming
    oldest_awaiting_age_s: float  # since the oldest transaction still awaiting the replica was committed
    problems: list[str] = field(default_factory=list)  # what is stuck; empty when all is well

    def describe(self) -> str:
        s = self.stats
        return (
            f"confirmed {self.confirmed}, reclaimed {self.reclaimed}; buffered {s.depth} (oldest {s.oldest_age_s:.0f} s),"
            f" awaiting the replica {s.awaiting_replica} (oldest {self.oldest_awaiting_age_s:.0f} s),"
            f" dead-lettered {s.dead_letters}"
        )


def reconcile(
    buffer: Buffer, position: Callable[[], Lsn], stuck_after_s: float, min_idle_ms: int, consumer: str = CONSUMER
) -> Reconciliation:
    """One pass; ``position`` tells how far this site can read (the replica's replay, or the main site's primary).

    A transaction is stuck when it has been buffered, or committed without being confirmed, for more
    than ``stuck_after_s``; an unknown replica position is a problem too, but never stops the rest.
    """
    buffer.ensure_group()  # a new site may reconcile before its first drain
    reclaimed = buffer.reclaim(consumer, min_idle_ms)
    problems, confirmed = [], 0
    try:
        confirmed = confirm(buffer, position()).confirmed
    except ReplicaError as exc:
        problems.append(f"cannot confirm: {exc}")
    stats = buffer_stats(buffer.client, buffer)
    awaiting_age = oldest_awaiting_age_s(buffer)
    if stats.oldest_age_s > stuck_after_s:
        problems.append(
            f"{stats.depth} transactions buffered, the oldest for {stats.oldest_age_s:.0f} s:"
            " is the drain running, is the primary reachable?"
        )
    if awaiting_age > stuck_after_s:
        problems.append(
            f"{stats.awaiting_replica} committed transactions not replicated, the oldest for {awaiting_age:.0f} s:"
            " is the replica replaying?"
        )
    return Reconciliation(reclaimed, confirmed, stats, awaiting_age, problems)


def oldest_awaiting_age_s(buffer: Buffer) -> float:
    """Age of the lowest-LSN transaction awaiting the replica, from its recorded commit time; 0 when none."""
    oldest = buffer.oldest_awaiting()
    status = buffer.status(oldest) if oldest else None
    if not status or not status.get("committed_at"):
        return 0.0
    return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(status["committed_at"])).total_seconds())
