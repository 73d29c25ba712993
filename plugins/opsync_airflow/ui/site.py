"""The site as the page sees it: one measurement through the DAGs' own connections, judged by the alert rules.

The buffer, the primary and the replica come from the Airflow connections ``opsync_buffer``,
``opsync_primary`` and ``opsync_replica`` (the hooks the DAGs use), so the page and the drain can
never disagree about which site they look at.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from opsync.buffer import Buffer
from opsync.config import get_settings
from opsync.monitoring.alerts import Finding, Level, Thresholds, evaluate
from opsync.monitoring.drain_metrics import DrainMetrics, drain_metrics, rate_per_minute
from opsync.monitoring.status import SiteStatus, one_line, site_status
from opsync_airflow.hooks import PRIMARY_CONN_ID, REPLICA_CONN_ID, SiteBufferHook, SiteDatabaseHook

CONNECT_TIMEOUT_S = 5  # a page waits this long at most for the primary, which is often out of reach
RATE_MINUTES = 60


@dataclass(frozen=True)
class Snapshot:
    status: SiteStatus
    rate: list[tuple[int, int]]  # (minute start, records applied), oldest first; empty when Redis is unavailable
    metrics: DrainMetrics | None  # None when Redis is unavailable
    findings: dict[str, Finding]  # figure -> its level against the thresholds

    def as_json(self) -> dict:
        return self.status.as_json() | {
            "drain": self.metrics
            and {
                "failed_runs_consecutive": self.metrics.failed_runs_consecutive,
                "records_applied_last_hour": sum(n for _, n in self.rate),
                "rate_per_minute": [[minute, n] for minute, n in self.rate],
            },
            "findings": {f.figure: {"value": f.value, "level": str(f.level), "message": f.message} for f in self.findings.values()},
        }


@contextmanager
def site_buffer() -> Iterator[Buffer]:
    buffer = SiteBufferHook().get_buffer()
    try:
        yield buffer
    finally:
        buffer.client.close()


def measure(buffer: Buffer) -> Snapshot:
    """Everything on the page at one moment; a part that cannot be reached shows as unavailable, never as a 500."""
    primary = SiteDatabaseHook(PRIMARY_CONN_ID, CONNECT_TIMEOUT_S).get_engine()
    replica = SiteDatabaseHook(REPLICA_CONN_ID, CONNECT_TIMEOUT_S).get_engine()
    try:
        status = site_status(buffer, primary, replica, slot=get_settings().site)
    finally:
        primary.dispose()
        replica.dispose()
    metrics, rate = None, []
    if "redis" not in status.unavailable:  # else each call would wait through redis-py's retries again
        try:
            metrics, rate = drain_metrics(buffer.client, buffer), rate_per_minute(buffer.client, buffer, RATE_MINUTES)
        except redis.RedisError as exc:
            status.unavailable["redis"] = one_line(exc)
    findings = {f.figure: f for f in evaluate(status, metrics or DrainMetrics(), Thresholds())}
    if metrics is None:  # the defaults would read as "no failed runs": not knowing is worth a look
        findings["drain_failed_runs"] = Finding(
            "drain_failed_runs", None, Level.warn, "drain runs unknown: site buffer (Redis) unavailable"
        )
    return Snapshot(status, rate, metrics, findings)
