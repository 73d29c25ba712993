"""``GET /metrics`` for Prometheus: request counts and latency per route, the buffer's figures and the drainer's.

Buffer gauges are measured when Prometheus scrapes (a collector), so there is no background loop
and no stale figure. The drainer runs in short Airflow tasks that nothing could scrape: it counts
its batches, runs and errors in the buffer's Redis (:mod:`opsync.monitoring.drain_metrics`), and this API
exposes them, read at scrape time too. Requests are labelled with the route template, never the concrete path, so
IDs cannot blow up the number of series.
"""

import math
import os
import time
from datetime import UTC, datetime
from functools import cache

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import Message, Receive, Scope, Send

from ingest_api.deps import get_buffer, get_primary
from ingest_api.guards import HttpMiddleware
from ingest_api.reads import get_replica
from opsync.buffer.figures import buffer_stats
from opsync.config import get_settings
from opsync.monitoring.capacity import capacity
from opsync.monitoring.drain_metrics import ERROR_CLASSES, drain_metrics
from opsync.monitoring.status import SiteStatus, measure_replication
from opsync.read_model.figures import read_model_figures
from opsync.stats import high_water

REGISTRY = CollectorRegistry()
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
UNROUTED = "unrouted"  # answered before routing (404, 413 by Content-Length): no template to name
CLIENT_CLOSED = 499  # the client hung up before any answer (nginx's code): counted, but not as the API's error
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0)

REQUESTS = Counter(
    "opsync_http_requests", "HTTP requests by route template, method and status", ["route", "method", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "opsync_http_request_duration_seconds",
    "Time until the response starts (an event stream counts its setup, not its lifetime)",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


class RequestMetrics(HttpMiddleware):
    """Counts and times every answer, the guards' included (it is the outermost middleware)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        started = False

        async def timed_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                observe(scope, message["status"], time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not started:
                observe(scope, 500, time.perf_counter() - start)
            raise
        if not started:
            observe(scope, CLIENT_CLOSED, time.perf_counter() - start)


def observe(scope: Scope, status: int, seconds: float) -> None:
    route = scope.get("route")
    method = scope["method"] if scope["method"] in METHODS else "other"
    requests, latency = series(getattr(route, "path", UNROUTED), method, status)
    requests.inc()
    latency.observe(seconds)


@cache
def series(template: str, method: str, status: int) -> tuple[Counter, Histogram]:
    """The request counter and latency histogram of one route, method and status, looked up once:
    ``labels()`` checks and locks on every call. Bounded: templates and methods are finite, statuses few."""
    return REQUESTS.labels(template, method, str(status)), LATENCY.labels(template, method)


class BufferCollector(Collector):
    """The buffer's figures at scrape time; ``opsync_buffer_up`` 0 (and no other figure) when Redis is unreachable."""

    def collect(self):
        buffer, settings = get_buffer(), get_settings()
        try:
            stats = buffer_stats(buffer.client, buffer)
        except redis.RedisError:
            yield GaugeMetricFamily("opsync_buffer_up", "1 when the site buffer (Redis) answers", value=0)
            return
        above = high_water(stats, settings) is not None
        figures = {
            "opsync_buffer_up": ("1 when the site buffer (Redis) answers", 1),
            "opsync_buffer_depth": ("Transactions not yet acknowledged by the drainer", stats.depth),
            "opsync_buffer_pending": ("Of those, claimed by a drainer and not yet acknowledged", stats.pending),
            "opsync_buffer_oldest_enqueued_timestamp_seconds": (
                "When the oldest unacknowledged transaction was buffered (absent: none)",
                stats.oldest_at,
            ),
            "opsync_committed_not_replicated": ("Committed in the primary, not yet replayed by the local replica", stats.awaiting_replica),
            "opsync_dead_letters": ("Transactions that failed permanently", stats.dead_letters),
            "opsync_buffer_memory_used_bytes": ("Memory Redis uses", stats.used_memory),
            "opsync_buffer_memory_max_bytes": ("Redis maxmemory (0: none set)", stats.maxmemory),
            "opsync_last_drain_timestamp_seconds": ("When the drainer last finished a drain (absent: never)", stats.last_drain_at),
            "opsync_last_confirm_timestamp_seconds": (
                "When transactions were last confirmed against the replica (absent: never)",
                stats.last_confirm_at,
            ),
            "opsync_buffer_high_water_entries": ("Depth at which writes get 503", settings.high_water_entries),
            "opsync_buffer_above_high_water": ("1 while writes are refused for backpressure", int(above)),
        }
        for name, (documentation, value) in figures.items():
            if value is not None:  # a moment that never happened has no sample (Prometheus practice), not a sentinel
                yield GaugeMetricFamily(name, documentation, value=value)


class DrainCollector(Collector):
    """The drainer's counters as it left them in Redis; nothing when Redis is unreachable (``opsync_buffer_up`` says so)."""

    def collect(self):
        buffer = get_buffer()
        try:
            m = drain_metrics(buffer.client, buffer)
        except redis.RedisError:
            return
        counters = {
            "opsync_drain_records_applied": ("Rows written to the primary by the drainer", m.records_applied),
            "opsync_drain_transactions_applied": ("Transactions applied to the primary by the drainer", m.transactions_applied),
            "opsync_drain_round_trips": ("Round trips to the primary made by drain batches", m.round_trips),
            "opsync_drain_runs": ("Drain runs (task attempts) finished, well or not", m.runs),
            "opsync_drain_runs_failed": ("Drain runs that failed", m.runs_failed),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(name, documentation, value=value)
        errors = CounterMetricFamily(
            "opsync_drain_errors",
            "Drain errors by class: failed runs (transient, redis, other), dead-lettered transactions (poison, dependent, unreadable)",
            labels=["class"],
        )
        for cls in ERROR_CLASSES:
            errors.add_metric([cls], m.errors.get(cls, 0))
        yield errors
        yield HistogramMetricFamily(
            "opsync_drain_batch_seconds",
            "Time of a drain batch, claim to settle",
            buckets=[(floatToGoString(bound), count) for bound, count in m.batch_buckets],
            sum_value=m.batch_seconds_sum,
        )
        yield GaugeMetricFamily(
            "opsync_drain_runs_failed_consecutive", "Drain runs failed in a row (0 after a success)", value=m.failed_runs_consecutive
        )
        if m.last_run_at is not None:
            yield GaugeMetricFamily(
                "opsync_drain_last_run_timestamp_seconds", "When a drain run last finished (absent: never)", value=m.last_run_at
            )


class ReadModelCollector(Collector):
    """The read-model publisher's figures (:mod:`opsync.read_model.figures`): poison rows and freshness; a figure
    that cannot be measured is left out."""

    def collect(self):
        figures = read_model_figures(get_buffer(), get_replica())
        if figures.poison_rows is not None:
            yield GaugeMetricFamily(
                "opsync_read_model_poison_rows", "Rows the publisher skips now: it cannot render or write them", value=figures.poison_rows
            )
            yield CounterMetricFamily(
                "opsync_read_model_poison_skipped", "Times a row became poison (skipped by the publisher)", value=figures.poison_skipped
            )
        if figures.freshness_s is not None:
            yield GaugeMetricFamily(
                "opsync_read_model_freshness_seconds",
                "Age of the oldest change the read model does not show yet (0: caught up)",
                value=figures.freshness_s,
            )


class CapacityCollector(Collector):
    """The forecasts (:mod:`opsync.monitoring.capacity`): ``+Inf`` is never at this rate, 0 is already; a figure not measured
    yet is left out. The replica's slot is read on the primary, so it is left out while the primary is out of reach
    (``opsync_replica_slot_up`` 0), and so is the replica's lag (which the alert rules need too)."""

    def collect(self):
        buffer, settings = get_buffer(), get_settings()
        try:
            c = capacity(buffer, settings)
        except redis.RedisError:
            c = None
        if c is not None:
            rates = {
                "opsync_buffer_ingest_transactions_per_second": (
                    "Transactions accepted per second over the capacity window",
                    c.ingest_per_s,
                ),
                "opsync_backlog_finished_transactions_per_second": (
                    "Transactions per second that left the backlog (replicated or failed)",
                    c.finished_per_s,
                ),
                "opsync_drain_applied_transactions_per_second": (
                    "Transactions per second the drain applied to the primary",
                    c.applied_per_s,
                ),
                "opsync_buffer_transaction_memory_bytes": (
                    "Redis memory per transaction buffered, measured while nothing drained",
                    c.bytes_per_txn,
                ),
                "opsync_buffer_high_water_room_transactions": (
                    "Transactions the buffer takes before a high-water mark refuses writes",
                    c.room,
                ),
                "opsync_buffer_high_water_eta_seconds": (
                    "Until the high-water mark at the current ingest rate if nothing drains (+Inf: never, 0: reached)",
                    c.high_water.seconds,
                ),
                "opsync_drain_eta_seconds": (
                    "Until what waits now (unsent, awaiting the replica) is replicated, at the"
                    " rate the backlog clears (+Inf: it does not, 0: nothing waits)",
                    c.drain_eta.seconds,
                ),
            }
            for name, (documentation, value) in rates.items():
                if value is not None:
                    yield GaugeMetricFamily(name, documentation, value=value)
        yield from replication_figures(settings.site)


def replication_figures(name: str):
    """The slot and the replica's lag as :mod:`opsync.monitoring.status` measures them for the alerts: one query on the primary,
    one on the local replica; a lag that cannot be measured is left out."""
    measured = SiteStatus(at=datetime.now(UTC).isoformat())
    measure_replication(measured, get_primary(), get_replica(), name)
    if measured.lag_bytes is not None:
        yield GaugeMetricFamily(
            "opsync_replica_lag_bytes",
            "Replica behind the primary, bytes of WAL (while the replica is down, from the position its slot confirmed)",
            value=measured.lag_bytes,
        )
    if measured.lag_s is not None:
        yield GaugeMetricFamily(
            "opsync_replica_lag_seconds",
            "Replica behind the primary: 0 when caught up, else since it replayed a transaction",
            value=measured.lag_s,
        )
    slot = measured.slot
    yield GaugeMetricFamily("opsync_replica_slot_up", "1 when the primary answered about the replica's slot", value=int(slot is not None))
    if slot is None:
        return
    status = GaugeMetricFamily(
        "opsync_replica_slot_wal_status", "1 for the slot's wal_status now (missing: no such slot)", labels=["status"]
    )
    current = slot.wal_status if slot.exists else "missing"
    for state in ("reserved", "extended", "unreserved", "lost", "missing"):
        status.add_metric([state], int(state == current))
    yield status
    if slot.safe_wal_size is not None:
        yield GaugeMetricFamily(
            "opsync_replica_slot_safe_wal_bytes",
            "WAL the primary may still write before the slot is dropped (safe_wal_size)",
            value=slot.safe_wal_size,
        )
    yield GaugeMetricFamily(
        "opsync_replica_slot_max_wal_keep_bytes",
        "max_slot_wal_keep_size (+Inf: no limit)",
        value=math.inf if slot.max_keep is None else slot.max_keep,
    )


REGISTRY.register(BufferCollector())
REGISTRY.register(DrainCollector())
REGISTRY.register(ReadModelCollector())
REGISTRY.register(CapacityCollector())


def exposition_registry() -> CollectorRegistry:
    """This process's registry; with several workers (``PROMETHEUS_MULTIPROC_DIR`` set, see
    ``ingest_api.__main__``) one that sums every worker's files, plus the buffer's and the drainer's live figures."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(BufferCollector())
    registry.register(DrainCollector())
    registry.register(ReadModelCollector())
    registry.register(CapacityCollector())
    return registry


router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics() -> Response:
    """Prometheus text format; unauthenticated like the health checks (no record data in it)."""
    return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)
