"""The drainer's own figures, kept in the site buffer's Redis: what it applied, how fast, and how it failed.

The drain runs in short-lived Airflow task processes, so nothing in them could be scraped; instead
each batch and each run adds to a few small keys under the buffer's prefix, and whoever reads them
(``GET /metrics`` of the ingest API, the alert rules, the Airflow page, the Datasette dashboard)
sees the same figures. Every write is one Lua script (one round trip, atomic) stamped with Redis'
clock, the clock that also stamps the stream. Size stays bounded: the totals, the latency
histogram and the errors (a fixed set of classes) are small hashes; the per-minute counts of
records applied are one key per minute that expires after a day.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from opsync.buffer import Buffer

BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
"""Upper bounds (seconds) of the batch latency histogram: one round trip over the WAN is 0.2–0.5 s."""

ERROR_CLASSES = ("transient", "poison", "dependent", "unreadable", "redis", "other")
"""What went wrong, as the drain tells it apart: the primary could not take a batch (link down, timeout:
``transient``), the primary refused a transaction for good (``poison``, dead-lettered), a transaction
needed a dead-lettered one (``dependent``), an envelope could not be decoded (``unreadable``), the buffer
itself failed (``redis``), anything else (``other``). A fixed set keeps Prometheus' label values few."""

MINUTE_TTL_S = 25 * 3600  # a day of per-minute counts, and an hour to spare
MAX_MINUTES = 24 * 60

RECORD_BATCH = """
-- KEYS: totals, latency histogram, errors; ARGV: minute key prefix, minute ttl, records, transactions,
--       seconds, round trips, histogram bucket, then error class, count pairs
local now = redis.call('TIME')
local minute = now[1] - now[1] % 60
redis.call('HINCRBY', KEYS[1], 'records_applied', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'transactions_applied', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'batches', 1)
redis.call('HINCRBY', KEYS[1], 'round_trips', ARGV[6])
redis.call('HINCRBYFLOAT', KEYS[1], 'batch_seconds_sum', ARGV[5])
redis.call('HSET', KEYS[1], 'last_batch_s', ARGV[5], 'last_batch_at', now[1])
redis.call('HINCRBY', KEYS[2], ARGV[7], 1)
local bucket = ARGV[1] .. minute
redis.call('INCRBY', bucket, ARGV[3])
redis.call('EXPIRE', bucket, ARGV[2])
for i = 8, #ARGV, 2 do redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1]) end
"""

RECORD_RUN = """
-- KEYS: totals, errors; ARGV: 'ok' or the error class
local now = redis.call('TIME')
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('HSET', KEYS[1], 'last_run_at', now[1] .. '.' .. string.format('%06d', now[2]))
if ARGV[1] == 'ok' then
  redis.call('HSET', KEYS[1], 'failed_consecutive', 0)
else
  redis.call('HINCRBY', KEYS[1], 'runs_failed', 1)
  redis.call('HINCRBY', KEYS[1], 'failed_consecutive', 1)
  redis.call('HSET', KEYS[1], 'last_error_class', ARGV[1])
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
end
"""

RATE = """
-- KEYS: none (the minute keys are computed); ARGV: minute key prefix, minutes
local now = redis.call('TIME')
local last = now[1] - now[1] % 60
local n = tonumber(ARGV[2])
local keys = {}
for i = 1, n do keys[i] = ARGV[1] .. (last - (n - i) * 60) end
local counts = redis.call('MGET', unpack(keys))
for i = 1, n do counts[i] = tonumber(counts[i] or 0) end
return {last, counts}
"""


def totals_key(buffer: Buffer) -> str:
    return buffer.drain_totals


def latency_key(buffer: Buffer) -> str:
    return buffer.drain_latency


def errors_key(buffer: Buffer) -> str:
    return buffer.drain_errors


def minute_prefix(buffer: Buffer) -> str:
    """Keys ``Keys.drain_minutes`` + ``<epoch of the minute>``: records applied in that minute."""
    return buffer.drain_minutes


@dataclass(frozen=True)
class DrainMetrics:
    records_applied: int = 0  # rows written (steps of applied transactions)
    transactions_applied: int = 0
    batches: int = 0
    round_trips: int = 0  # to the primary
    runs: int = 0  # drain task attempts that finished, well or not
    runs_failed: int = 0
    failed_runs_consecutive: int = 0  # reset by a successful run: "drain failing for N runs"
    last_error_class: str | None = None
    errors: Mapping[str, int] = field(default_factory=dict)  # class (ERROR_CLASSES) -> count
    batch_seconds_sum: float = 0.0
    batch_buckets: tuple[tuple[float, int], ...] = ()  # (upper bound, cumulative count) as Prometheus has them
    last_batch_s: float | None = None
    last_run_age_s: float | None = None  # by Redis' clock; None: never ran
    last_run_at: float | None = None  # Unix time (Redis' clock) the last run finished; None: never ran

    @property
    def mean_batch_s(self) -> float | None:
        return self.batch_seconds_sum / self.batches if self.batches else None

    def batch_quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (as ``histogram_quantile`` would bound it)."""
        if not self.batches:
            return None
        rank = q * self.batches
        return next(bound for bound, count in self.batch_buckets if count >= rank)


def record_batch(
    buffer: Buffer,
    *,
    records: int,
    transactions: int,
    seconds: float,
    round_trips: int,
    errors: Mapping[str, int] | None = None,
) -> None:
    """Count one applied batch, its latency and its per-transaction errors, and bump this minute's records."""
    pairs = [item for cls, n in (errors or {}).items() if n for item in (known_class(cls), n)]
    buffer.client.register_script(RECORD_BATCH)(
        keys=[totals_key(buffer), latency_key(buffer), errors_key(buffer)],
        args=[minute_prefix(buffer), MINUTE_TTL_S, records, transactions, repr(float(seconds)), round_trips, bucket_label(seconds), *pairs],
    )


def record_run(buffer: Buffer, *, ok: bool, error_class: str | None = None) -> None:
    """Count a finished drain run; a failed one also counts its error class and the failures in a row."""
    outcome = "ok" if ok else known_class(error_class or "other")
    buffer.client.register_script(RECORD_RUN)(keys=[totals_key(buffer), errors_key(buffer)], args=[outcome])


def rate_per_minute(client: redis.Redis, buffer: Buffer, minutes: int = 60) -> list[tuple[int, int]]:
    """``(minute start in epoch seconds, records applied in it)`` for the last ``minutes`` minutes, oldest
    first, zero-filled; the last is the current (partial) minute by Redis' clock."""
    if not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be between 1 and {MAX_MINUTES}, not {minutes}")
    last, counts = client.register_script(RATE)(args=[minute_prefix(buffer), minutes])
    return [(last - (minutes - 1 - i) * 60, int(count)) for i, count in enumerate(counts)]


def drain_metrics(client: redis.Redis, buffer: Buffer) -> DrainMetrics:
    """Every figure in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(totals_key(buffer))
    pipe.hgetall(latency_key(buffer))
    pipe.hgetall(errors_key(buffer))
    (seconds, micros), totals, latency, errors = pipe.execute()
    totals = {k.decode(): v.decode() for k, v in totals.items()}
    observed = {float(k): int(v) for k, v in latency.items()}
    cumulative, running = [], 0
    for bound in BATCH_BUCKETS:
        running += observed.get(bound, 0)
        cumulative.append((bound, running))
    last_run = totals.get("last_run_at")
    return DrainMetrics(
        records_applied=int(totals.get("records_applied", 0)),
        transactions_applied=int(totals.get("transactions_applied", 0)),
        batches=int(totals.get("batches", 0)),
        round_trips=int(totals.get("round_trips", 0)),
        runs=int(totals.get("runs", 0)),
        runs_failed=int(totals.get("runs_failed", 0)),
        failed_runs_consecutive=int(totals.get("failed_consecutive", 0)),
        last_error_class=totals.get("last_error_class"),
        errors={k.decode(): int(v) for k, v in sorted(errors.items())},
        batch_seconds_sum=float(totals.get("batch_seconds_sum", 0)),
        batch_buckets=tuple(cumulative),
        last_batch_s=float(totals["last_batch_s"]) if "last_batch_s" in totals else None,
        last_run_age_s=None if last_run is None else max(0.0, seconds + micros / 1e6 - float(last_run)),
        last_run_at=None if last_run is None else float(last_run),
    )


def known_class(name: str) -> str:
    """One of :data:`ERROR_CLASSES`; an unknown name counts as ``other`` so labels stay few."""
    return name if name in ERROR_CLASSES else "other"


def bucket_label(seconds: float) -> str:
    """The histogram field an observation falls in: the smallest upper bound at or above it."""
    return repr(next(bound for bound in BATCH_BUCKETS if seconds <= bound))
