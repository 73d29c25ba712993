"""``make bench-drain``: how fast the drainer moves the site buffer into the primary, next to a raw COPY.

It starts its own services in a temporary directory (the same helpers as ``make bench-ingest``:
a durable Redis with ``appendfsync always``, a migrated PostgreSQL primary with its streaming
replica) and measures, in one run:

- Drain: ``records`` records of mixed tables buffered as the API buffers them
  (:func:`opsync.ingest.build_transaction` + :meth:`opsync.buffer.Buffer.enqueue`): executed
  observations each in one transaction with their raw data package and files, and housekeeping
  samples in lists (one transaction per list), interleaved in stream order. They are drained into
  the primary with :func:`opsync.drain.drain` at the configured batch size (runs repeated while a
  run spends its time budget, as successive DAG runs would), then confirmed on the replica
  (:func:`opsync.drain.confirm_replica` until nothing awaits it). Drain time is split into its
  parts (Redis claim, envelope parsing, dead-row lookup, apply to the primary, settle).
- Baseline: the same rows (same keys and values) loaded by one raw ``COPY`` per table in one DB
  transaction into the same tables, emptied by ``TRUNCATE`` (same indexes, constraints and
  foreign keys; a ``CHECKPOINT`` and a caught-up replica before each timed load, for both).
- The same drain with 250 ms round trips between the drainer and the primary
  (:class:`devstack.wan.WanProxy`), ``wan_records`` records; the connection's set-up (paid
  once per drain task) is timed apart from the drain.
- Small transactions: ``small_txns`` single-record housekeeping transactions, each with an
  idempotency key as :mod:`opsync.client` sends them (the 48-hour outage's bulk), drained through
  the same 250 ms link as DAG runs do it: a drain run, the wait for the replica, the confirm, again
  until everything is ``replicated``. Baseline: one raw ``COPY`` of the same rows through the same
  link (connected beforehand), into the emptied table. ``small_projected_48h_min`` is the README's
  48-hour backlog (3,456,000 transactions) at the measured rate to ``replicated``; target ≤ 30 min.
- POST-to-replicated latency at a steady ``STEADY_RATE`` single-record POSTs per second to the real
  ingest API for ``steady_seconds``, with the drainer behind the same 250 ms link. A loop here
  stands in for the Airflow DAG ``opsync_drain``: every ``DAG_INTERVAL_S`` it drains (confirming between
  batches, as the drain task does), then polls
  the replica every ``POKE_S`` and confirms (the DAG's sensor and confirm task). The real DAG runs
  every 10 s and at once on a wake-up event, and each task start costs a few seconds, so under
  Airflow the figure is higher by that overhead. Per transaction: from its ``202`` (client clock)
  to its ``replicated_at`` (read from the status records in bulk at the end, same clock).
- The sweep that chose the default batch caps: for each candidate of ``SWEEP`` and the configured
  caps, through one 250 ms link in the same run, ``sweep_txns`` single-record transactions drained to
  ``replicated`` as DAG runs do it, then ``sweep_records`` records of the peak mix drained and
  confirmed. Per candidate: the rates, the batches' sizes, the drainer's RSS growth (:class:`Watch`:
  sampled, and above what the process holds already, so memory an earlier phase freed and the
  allocator kept is reused uncounted: a lower bound), and the longest single Redis call (SLOWLOG).

Every phase drains with the product's batch caps (:class:`opsync.drain.BatchSettings`:
``OPSYNC_DRAIN_BATCH_*`` or their defaults, as the DAG does); ``--batch``, ``--batch-records`` and
``--batch-bytes`` override them (the sweep still measures its own candidates beside them).

``--size smoke`` runs every phase on a few thousand records and 5 s of steady ingest, and the sweep
on the configured caps alone: it checks the benchmark still runs and prints every figure (``FIGURES``), in well
under a minute; its figures mean little. ``--records``, ``--wan-records``, ``--small-txns``,
``--steady-seconds``, ``--sweep-txns``, ``--sweep-records`` and ``--sweep-candidates`` override the size's.

Prints a summary, then one JSON line with every figure, last.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httptools
import psutil
import psycopg
import redis
import uvloop
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, make_url, text

from devstack.wan import WanProxy
from opsync import drain as drainer
from opsync.buffer import Buffer
from opsync.connections import Timeouts, engine_options
from opsync.drain import BatchLimits, BatchSettings, DrainSummary, confirm_replica, drain
from opsync.envelope import Transaction
from opsync.ingest import StepIn, build_transaction
from opsync.lsn import current_position, replica_position

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: services, API server, samples, HTTP client)

BUDGET_S = 60  # OPSYNC_DRAIN_BUDGET_S's default: a run starts no batch after this; the next run goes on
FILES_PER_OBS = 10  # raw files per executed observation; with the observation and its package, 12 records
HK_PER_LIST = 100  # housekeeping samples per POSTed list (one transaction)
OBS_SHARE = 0.12  # share of records in observation transactions; the rest is housekeeping
SENSORS = 25  # per module, 4 modules: a 100-sample list is one sweep of every sensor
MODULES = 4
WAN_ONE_WAY_S = 0.125  # 250 ms round trips
STEADY_RATE = 200
DAG_INTERVAL_S = 2.0  # the drain loop standing in for the DAG's schedule
POKE_S = 0.5  # replica polls of the stand-in sensor
CONNECTIONS = 16  # keep-alive connections of the steady generator (answers take milliseconds)
LONG_RUN_S = 15  # a drain run of the steady phase this long could not keep up (half the full phase)
SETTLE_TIMEOUT_S = 60  # after the last POST, how long the steady phase waits for everything to be replicated
TARGET_DRAIN_VS_COPY, TARGET_WAN_RECORDS_PER_S, TARGET_P95_S = 0.5, 10_000, 15.0
OUTAGE_TXNS = 3_456_000  # the README's 48-hour outage at its peak rate, nearly all single-record transactions
TARGET_OUTAGE_MIN = 30  # issue 17: everything replicated this soon after the link returns
DATA_TABLES = ("executed_obs_unit", "raw_data_package", "raw_data_file", "housekeeping_sample")  # foreign-key order
SHA = "5d" * 32
MIB = 2**20
SWEEP = (  # candidate caps, smallest first: the first two are the figures before the sweep chose the defaults
    BatchLimits(1000, 20_000, 16 * MIB),  # what bench-drain, bench-scripts and `opsync backlog drain` still used
    BatchLimits(2000, 20_000, 16 * MIB),  # the defaults before the sweep
    BatchLimits(4000, 40_000, 32 * MIB),
    BatchLimits(8000, 80_000, 64 * MIB),
)


@dataclass(frozen=True)
class Size:
    records: int  # drained locally
    wan_records: int  # drained at 250 ms RTT
    small_txns: int  # single-record transactions drained and confirmed at 250 ms RTT
    steady_seconds: int  # of steady ingest
    sweep_txns: int  # single-record transactions per candidate of the sweep
    sweep_records: int  # records of the peak mix per candidate of the sweep
    sweep_candidates: int  # how many of SWEEP (the configured limits are always measured too)


SIZES = {
    "full": Size(
        records=200_000,
        wan_records=50_000,
        small_txns=100_000,
        steady_seconds=30,
        sweep_txns=60_000,
        sweep_records=300_000,
        sweep_candidates=len(SWEEP),
    ),
    "smoke": Size(
        records=5_000, wan_records=2_000, small_txns=3_000, steady_seconds=5, sweep_txns=500, sweep_records=1_000, sweep_candidates=0
    ),
}
FIGURES = (
    "records",
    "transactions",
    "batch_size",
    "batch_records",
    "batch_bytes",
    "buffer_records_per_s",
    "drain_s",
    "drain_records_per_s",
    "drain_batches",
    "round_trips_per_batch",
    "drain_share_claim",
    "drain_share_parse",
    "drain_share_dead_rows",
    "drain_share_apply",
    "drain_share_settle",
    "drain_client_cpu_s",
    "drain_apply_client_cpu_s",
    "drain_apply_wait_s",
    "confirm_s",
    "confirmed_txns",
    "copy_s",
    "copy_records_per_s",
    "drain_vs_copy",
    "wan_records",
    "wan_transactions",
    "wan_batches",
    "wan_round_trips_per_batch",
    "wan_connect_s",
    "drain_s_250ms_rtt",
    "drain_records_per_s_250ms_rtt",
    "drain_records_per_s_250ms_rtt_with_connect",
    "small_txns",
    "small_batch_size",
    "small_batches",
    "small_round_trips_per_batch",
    "small_drain_s",
    "small_drain_txns_per_s",
    "small_confirm_wait_s",
    "small_replicated_s",
    "small_replicated_txns_per_s",
    "small_copy_s",
    "small_copy_rows_per_s",
    "small_drain_vs_copy",
    "small_projected_48h_min",
    "target_small_projected_48h_min",
    "small_target_met",
    "steady_posts",
    "steady_accepted",
    "steady_errors",
    "steady_not_replicated",
    "post_to_replicated_p50_s",
    "post_to_replicated_p95_s",
    "post_to_replicated_p99_s",
    "post_to_replicated_max_s",
    "steady_drain_runs",
    "steady_drain_batches",
    "steady_drain_run_mean_s",
    "steady_drain_run_max_s",
    "steady_run_to_replicated_mean_s",
    "steady_generator_lag_p99_ms",
    "target_drain_vs_copy",
    "target_records_per_s_250ms_rtt",
    "target_post_to_replicated_p95_s",
    "drain_vs_copy_target_met",
    "wan_target_met",
    "p95_target_met",
    "sweep",
    "sweep_configured",
    "sweep_configured_small_replicated_txns_per_s",
    "sweep_configured_mixed_records_per_s",
    "sweep_best_small",
    "sweep_best_mixed",
    "sweep_longest_redis_call_ms",
    "sweep_max_rss_growth_mib",
)


# --- workload ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planning:
    """Direct-table rows the buffered records reference (they live in the primary already)."""

    modules: list[str]
    obs_units: list[str]


def planning(primary: Engine) -> Planning:
    tag = uuid.uuid4().hex[:8]
    modules, obs_units = [str(uuid.uuid4()) for _ in range(MODULES)], [str(uuid.uuid4()) for _ in range(20)]
    instrument = str(uuid.uuid4())
    with primary.begin() as conn:
        conn.execute(text("INSERT INTO instrument (id, name) VALUES (:i, :n)"), {"i": instrument, "n": f"CHAI-{tag}"})
        for index, module in enumerate(modules):
            conn.execute(
                text("INSERT INTO instrument_module (id, instrument_id, name) VALUES (:m, :i, :n)"),
                {"m": module, "i": instrument, "n": f"band-{index}"},
            )
        for index, obs in enumerate(obs_units):
            conn.execute(
                text(
                    "INSERT INTO obs_unit (id, name, program, source_name, ra_deg, dec_deg)"
                    " VALUES (:o, :n, 'P-BENCH', 'Orion KL', 83.8, -5.4)"
                ),
                {"o": obs, "n": f"orion-{tag}-{index}"},
            )
    return Planning(modules, obs_units)


class Workload:
    """Transactions as scripts POST them: observations with their package and files, housekeeping lists."""

    def __init__(self, plan: Planning, start: datetime):
        self.plan = plan
        self.tag = uuid.uuid4().hex[:8]
        self.start = start
        self.observations = 0
        self.sweeps = 0

    def observation(self) -> list[StepIn]:
        n = self.observations = self.observations + 1
        begin = self.start + timedelta(minutes=5 * n)
        obs = StepIn(
            table="executed_obs_unit",
            ref="obs",
            values={
                "obs_unit_id": self.plan.obs_units[n % len(self.plan.obs_units)],
                "instrument_module_id": self.plan.modules[n % MODULES],
                "status": "completed",
                "start_time": begin.isoformat(),
                "end_time": (begin + timedelta(minutes=4)).isoformat(),
                "metadata": {"pwv_mm": round(0.4 + (n % 50) / 100, 2), "tau_225": round(0.03 + (n % 7) / 100, 3), "scan": "otf"},
            },
        )
        package = StepIn(
            table="raw_data_package",
            ref="pkg",
            values={
                "name": f"bench-{self.tag}-{n:07d}.tar",
                "executed_obs_unit_id": {"$ref": "obs"},
                "status": "sealed",
                "size_bytes": FILES_PER_OBS * 734_003_200,
                "checksum_sha256": SHA,
            },
        )
        files = [
            StepIn(
                table="raw_data_file",
                values={
                    "path": f"/data/bench/{self.tag}/{n:07d}/scan_{i:03d}.{'fits' if i else 'log'}",
                    "size_bytes": 734_003_200 if i else 81_920,
                    "checksum_sha256": SHA,
                    "file_type": "fits" if i else "log",
                    "executed_obs_unit_id": {"$ref": "obs"},
                    "raw_data_package_id": {"$ref": "pkg"},
                },
            )
            for i in range(FILES_PER_OBS)
        ]
        return [obs, package, *files]

    def housekeeping(self, size: int) -> list[StepIn]:
        """One sweep: each (module, sensor) once, at the sweep's time, so the unique key holds."""
        self.sweeps += 1
        at = (self.start + timedelta(seconds=10 * self.sweeps)).isoformat()
        return [
            StepIn(
                table="housekeeping_sample",
                values={
                    "instrument_module_id": self.plan.modules[i % MODULES],
                    "sensor": f"bench_{self.tag}_{i // MODULES:02d}",
                    "sampled_at": at,
                    "value": round(4.2 + ((self.sweeps + i) % 97) / 1000, 4),
                    "unit": "K",
                },
            )
            for i in range(size)
        ]

    def transactions(self, records: int) -> Iterator[list[StepIn]]:
        """Exactly ``records`` records, the two kinds interleaved so observations keep their share all along."""
        obs_size, done, in_obs = 2 + FILES_PER_OBS, 0, 0
        while done < records:
            left = records - done
            if in_obs < OBS_SHARE * (done + obs_size) and left >= obs_size:
                steps = self.observation()
                in_obs += len(steps)
            else:
                steps = self.housekeeping(min(HK_PER_LIST, left))
            done += len(steps)
            yield steps


@dataclass
class Buffered:
    txns: list[Transaction] = field(default_factory=list)
    records: int = 0
    seconds: float = 0.0

    def rows(self) -> dict[str, tuple[list[str], list[tuple]]]:
        """The rows as the primary gets them, per table: (columns, rows); what the baseline COPYs."""
        by_table: dict[str, tuple[list[str], list[tuple]]] = {}
        for txn in self.txns:
            for step in txn.steps:
                if step.table not in by_table:
                    by_table[step.table] = (["id", *sorted(step.values)], [])
                columns, rows = by_table[step.table]
                values = {**step.values, "id": str(step.key)}
                rows.append(tuple(json.dumps(values[c]) if isinstance(values[c], dict) else values[c] for c in columns))
        return by_table


def buffer_records(buffer: Buffer, workload: Workload, records: int) -> Buffered:
    """Validate and buffer each transaction as ``POST /v1/records`` and ``/v1/transactions`` do."""
    out = Buffered()
    started = time.perf_counter()
    for steps in workload.transactions(records):
        txn = build_transaction(steps, "observatory")
        answer = {
            "txn_id": str(txn.txn_id),
            "ids": [str(s.key) for s in txn.steps],
            "state": "accepted",
            "accepted_at": txn.accepted_at.isoformat(),
        }
        buffer.enqueue(txn, answer)
        out.txns.append(txn)
        out.records += len(steps)
    out.seconds = time.perf_counter() - started
    return out


# --- drain, confirm, baseline ------------------------------------------------------------------------


class Parts:
    """Wall time of each part of the drain, by wrapping the functions :func:`opsync.drain.drain_batch` calls."""

    NAMES = ("claim", "parse", "dead_rows", "apply", "settle")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)  # this thread's CPU: the rest of the wall time is waiting (server, Redis)

    def timed(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.cpu[name] += time.thread_time() - cpu

        return wrapper

    @contextmanager
    def watching(self, buffer: Buffer) -> Iterator["Parts"]:
        originals = {name: getattr(drainer, name) for name in ("read_entries", "dead_rows", "apply_batch")}
        drainer.read_entries = self.timed("parse", originals["read_entries"])
        drainer.dead_rows = self.timed("dead_rows", originals["dead_rows"])
        drainer.apply_batch = self.timed("apply", originals["apply_batch"])
        buffer.claim = self.timed("claim", buffer.claim)
        buffer.settle = self.timed("settle", buffer.settle)
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(drainer, name, original)
            del buffer.claim, buffer.settle

    def shares(self, total: float) -> dict[str, float]:
        return {name: round(self.seconds[name] / total, 3) for name in self.NAMES}


def drain_everything(buffer: Buffer, primary: Engine, limits: BatchLimits) -> DrainSummary:
    """Drain until the buffer is empty: one ``drain`` call is one DAG run; a run that spent its budget is followed by the next."""
    total = DrainSummary()
    started = time.monotonic()
    while True:
        run = drain(buffer, primary, budget_s=BUDGET_S, **batch_options(limits))
        for name in ("batches", "applied", "duplicates", "dead_lettered", "round_trips", "reclaimed"):
            setattr(total, name, getattr(total, name) + getattr(run, name))
        if run.max_commit_lsn is not None:
            total.max_commit_lsn = max(total.max_commit_lsn or run.max_commit_lsn, run.max_commit_lsn)
        if not run.budget_spent:
            break
    total.elapsed_s = time.monotonic() - started
    return total


def batch_options(limits: BatchLimits) -> dict[str, int]:
    """``drain``'s keyword arguments for ``limits``."""
    return {"batch_size": limits.transactions, "batch_records": limits.records, "batch_bytes": limits.bytes}


def confirm_everything(buffer: Buffer, replica: Engine, timeout_s: float = 120) -> tuple[int, float]:
    """Confirm until nothing awaits the replica: (transactions confirmed, seconds)."""
    started, confirmed = time.perf_counter(), 0
    while True:
        confirmation = confirm_replica(buffer, replica)
        confirmed += confirmation.confirmed
        if not confirmation.remaining:
            return confirmed, time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"{confirmation.remaining} transactions still await the replica after {timeout_s} s")
        time.sleep(0.01)


def quiesce(primary: Engine, replica: Engine, timeout_s: float = 120) -> None:
    """A checkpoint, then wait for the replica to replay everything: each timed load starts from the same state."""
    with primary.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CHECKPOINT"))
    target, deadline = current_position(primary), time.monotonic() + timeout_s
    while replica_position(replica) < target:
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not catch up")
        time.sleep(0.05)


def truncate(primary: Engine) -> None:
    with primary.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(DATA_TABLES)}"))


def copy_load(conninfo: str, rows: dict[str, tuple[list[str], list[tuple]]]) -> float:
    """One raw ``COPY`` per table, parents first, in one DB transaction; seconds from the first row to the commit."""
    with psycopg.connect(conninfo) as conn:
        started = time.perf_counter()
        with conn.cursor() as cursor:
            for table in DATA_TABLES:
                if table not in rows:
                    continue
                columns, values = rows[table]
                statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(statement) as copy:
                    for row in values:
                        copy.write_row(row)
        conn.commit()
        return time.perf_counter() - started


def count_rows(primary: Engine) -> int:
    with primary.connect() as conn:
        return sum(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() for table in DATA_TABLES)


def redis_client(site) -> redis.Redis:
    """Read timeouts above any command's time: settling or confirming a 1,000-transaction batch is one long call."""
    return redis.Redis.from_url(site.redis.url, socket_timeout=60)


def engine(url: str, port: int | None = None, autocommit: bool = False) -> Engine:
    """An engine as the tasks' hook builds it: psycopg 3, :func:`opsync.connections.engine_options` (``autocommit`` as the drain task's)."""
    if port is not None:
        url = make_url(url).set(port=port).render_as_string(hide_password=False)
    return create_engine(url, **engine_options(Timeouts(10), autocommit=autocommit))


# --- small transactions: drained and confirmed as the DAG runs do it ---------------------------------


def buffer_small(buffer: Buffer, workload: Workload, txns: int) -> Buffered:
    """``txns`` single-record housekeeping transactions, each with its idempotency key, as ``opsync.client`` POSTs them."""
    out = Buffered()
    started = time.perf_counter()
    for index in range(txns):
        key = f"bench-{workload.tag}-{index}"
        txn = build_transaction(workload.housekeeping(1), "observatory", idempotency_key=key)
        answer = {
            "txn_id": str(txn.txn_id),
            "ids": [str(txn.steps[0].key)],
            "state": "accepted",
            "accepted_at": txn.accepted_at.isoformat(),
        }
        buffer.enqueue(txn, answer, idempotency=("bench-client", key), body_hash=key)
        out.txns.append(txn)
        out.records += 1
    out.seconds = time.perf_counter() - started
    return out


@dataclass
class Cycles:
    """DAG runs of the small-transaction phase: drain, wait for the replica, confirm."""

    summary: DrainSummary = field(default_factory=DrainSummary)
    drain_s: float = 0.0  # in drain runs
    replicated_s: float = 0.0  # from the first claim to every transaction replicated


def drain_to_replicated(buffer: Buffer, primary: Engine, replica: Engine, limits: BatchLimits) -> Cycles:
    """As ``opsync_drain`` runs back to back on a backlog: each run drains for its budget (confirming between
    batches what the replica has passed, as the drain task does), its sensor waits for the replica to pass
    the run's commits, its confirm task confirms the rest; until a run ends short."""
    cycles, started = Cycles(), time.monotonic()
    while True:
        run_started = time.monotonic()
        run = drain(buffer, primary, budget_s=BUDGET_S, readable=lambda: replica_position(replica), **batch_options(limits))
        cycles.drain_s += time.monotonic() - run_started
        for name in ("batches", "applied", "duplicates", "dead_lettered", "round_trips"):
            setattr(cycles.summary, name, getattr(cycles.summary, name) + getattr(run, name))
        if run.max_commit_lsn is not None:
            while replica_position(replica) < run.max_commit_lsn:
                time.sleep(POKE_S)
        confirm_replica(buffer, replica)
        if not run.budget_spent:
            break
    confirm_everything(buffer, replica)
    cycles.replicated_s = time.monotonic() - started
    return cycles


def small_txns(
    site,
    primary_url: str,
    primary: Engine,
    replica: Engine,
    plan: Planning,
    start: datetime,
    console: Console,
    txns: int,
    limits: BatchLimits,
) -> dict:
    buffer = Buffer(redis_client(site), prefix="bench-drain-small")
    console.print(f"buffering {txns:,} single-record transactions with idempotency keys …")
    small = buffer_small(buffer, Workload(plan, start), txns)
    truncate(primary)  # the WAN phase's rows: only this phase's are counted
    quiesce(primary, replica)
    with WanProxy("127.0.0.1", site.primary.port, delay_s=WAN_ONE_WAY_S) as wan:
        far = engine(primary_url, wan.port, autocommit=True)
        try:
            with far.connect():  # connected once per drain task: not part of the rate
                pass
            console.print(
                f"draining and confirming them through the WAN proxy (250 ms round trips), as DAG runs, batches of {describe(limits)} …"
            )
            cycles = drain_to_replicated(buffer, far, replica, limits)
        finally:
            far.dispose()
        summary = cycles.summary
        assert summary.applied == txns and not summary.dead_lettered, summary.describe()
        assert count_rows(primary) == txns
        truncate(primary)
        quiesce(primary, replica)
        console.print("baseline: the same rows by one raw COPY through the same link …")
        copy_s = copy_load(psycopg.conninfo.make_conninfo(site.primary.conninfo(), port=wan.port), small.rows())
        assert count_rows(primary) == txns
    truncate(primary)
    quiesce(primary, replica)
    rate = txns / cycles.replicated_s
    projected = OUTAGE_TXNS / rate / 60
    return {
        "small_txns": txns,
        "small_batch_size": limits.transactions,
        "small_batches": summary.batches,
        "small_round_trips_per_batch": round(summary.round_trips / summary.batches, 2),
        "small_drain_s": round(cycles.drain_s, 2),
        "small_drain_txns_per_s": round(txns / cycles.drain_s),
        "small_confirm_wait_s": round(cycles.replicated_s - cycles.drain_s, 2),
        "small_replicated_s": round(cycles.replicated_s, 2),
        "small_replicated_txns_per_s": round(rate),
        "small_copy_s": round(copy_s, 2),
        "small_copy_rows_per_s": round(txns / copy_s),
        "small_drain_vs_copy": round(copy_s / cycles.drain_s, 3),
        "small_projected_48h_min": round(projected, 1),
        "target_small_projected_48h_min": TARGET_OUTAGE_MIN,
        "small_target_met": projected <= TARGET_OUTAGE_MIN,
    }


# --- steady ingest: POST to replicated ----------------------------------------------------------------


class ReceiptConnection(ingest_bench.HttpConnection):
    """The ingest bench's keep-alive connection, also keeping the body: the answer's ``txn_id`` is needed."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bytearray()

    def on_message_begin(self) -> None:
        self.body = bytearray()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.response and not self.response.done():
            self.response.set_result((self.parser.get_status_code(), bytes(self.body)))


@dataclass
class Posted:
    accepted: dict[str, float] = field(default_factory=dict)  # txn_id -> wall time its 202 arrived
    errors: int = 0
    lags: list[float] = field(default_factory=list)


async def post_steadily(port: int, raws: list[bytes], rate: float) -> Posted:
    """Open loop: ``raws`` sent at fixed times ``1/rate`` apart, whatever the answers do."""
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[ReceiptConnection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait((await loop.create_connection(ReceiptConnection, "127.0.0.1", port))[1])
    posted = Posted()

    async def one(raw: bytes) -> None:
        conn = await idle.get()
        try:
            status, body = await conn.send(raw, ingest_bench.REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, httptools.HttpParserError):
            conn.transport.abort()
            posted.errors += 1
            idle.put_nowait((await loop.create_connection(ReceiptConnection, "127.0.0.1", port))[1])
            return
        at = time.time()
        idle.put_nowait(conn)
        if status == 202:
            posted.accepted[json.loads(body)["txn_id"]] = at
        else:
            posted.errors += 1

    tasks, start = [], time.perf_counter() + 0.01
    for index, raw in enumerate(raws):
        scheduled = start + index / rate
        if (wait := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        posted.lags.append(time.perf_counter() - scheduled)
        tasks.append(asyncio.create_task(one(raw)))
    await asyncio.gather(*tasks)
    for _ in range(idle.qsize()):
        idle.get_nowait().transport.close()
    return posted


class DagStandIn(threading.Thread):
    """What ``opsync_drain`` does, on a short fixed schedule: drain, wait for the replica, confirm."""

    def __init__(self, buffer: Buffer, primary_url: str, replica: Engine, limits: BatchLimits | None = None):
        super().__init__(name="dag-stand-in", daemon=True)
        self.buffer, self.primary_url, self.replica = buffer, primary_url, replica
        self.limits = limits or BatchSettings().limits()  # the DAG's: OPSYNC_DRAIN_BATCH_* or their defaults
        self.stopping = threading.Event()
        self.runs: list[tuple[int, int, float, float]] = []  # (applied, batches, drain seconds, start-to-confirmed seconds)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                primary = engine(self.primary_url, autocommit=True)  # as the drain task's: a new engine, so a new connection, per run
                try:
                    summary = drain(
                        self.buffer,
                        primary,
                        budget_s=BUDGET_S,
                        readable=lambda: replica_position(self.replica),
                        **batch_options(self.limits),
                    )  # as the drain task
                finally:
                    primary.dispose()
                drained = time.monotonic()
                if summary.max_commit_lsn is not None:
                    while replica_position(self.replica) < summary.max_commit_lsn:  # the sensor
                        time.sleep(POKE_S)
                    confirm_replica(self.buffer, self.replica)  # the confirm task
                self.runs.append((summary.applied, summary.batches, drained - started, time.monotonic() - started))
                self.stopping.wait(max(0.0, started + DAG_INTERVAL_S - time.monotonic()))
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def steady_ingest(
    site, primary_url: str, primary: Engine, replica: Engine, workdir: Path, console: Console, seconds: int, limits: BatchLimits
) -> dict:
    module = ingest_bench.instrument_module(primary)
    samples = ingest_bench.Samples(module)
    token = ingest_bench.replicated_token(primary, replica)
    buffer = Buffer(redis_client(site))  # the API's keys (default prefix)
    with ExitStack() as stack:
        server = stack.enter_context(ingest_bench.api_server(site, workdir / "api.log"))
        port = int(server.url.rsplit(":", 1)[1])
        requests = ingest_bench.Requests(port, token)
        wan = stack.enter_context(WanProxy("127.0.0.1", site.primary.port, delay_s=WAN_ONE_WAY_S))
        far_url = make_url(primary_url).set(port=wan.port).render_as_string(hide_password=False)
        loop = uvloop.new_event_loop()
        stack.callback(loop.close)
        raws = [requests.post(samples.body()) for _ in range(STEADY_RATE * seconds)]
        dag = DagStandIn(buffer, far_url, replica, limits)
        dag.start()
        console.print(
            f"steady ingest: {STEADY_RATE} single-record POSTs/s for {seconds} s, drained every "
            f"{DAG_INTERVAL_S:g} s through the 250 ms link …"
        )
        posted = loop.run_until_complete(post_steadily(port, raws, STEADY_RATE))
        ids, deadline = list(posted.accepted), time.monotonic() + SETTLE_TIMEOUT_S
        while dag.error is None and time.monotonic() < deadline:
            if all(s and s.get("state") == "replicated" for s in buffer.statuses(ids)):
                break
            time.sleep(0.5)
        dag.stopping.set()
        dag.join(60)
        if dag.error is not None:
            raise dag.error
    latencies = []
    for txn_id, status in zip(ids, buffer.statuses(ids), strict=True):
        if status and status.get("replicated_at"):
            latencies.append(datetime.fromisoformat(status["replicated_at"]).timestamp() - posted.accepted[txn_id])
        else:
            latencies.append(float("inf"))  # never replicated within the wait: counts against the percentiles
    latencies.sort()
    drains = [r for r in dag.runs if r[0]]

    def q(p: float) -> float:
        value = latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("inf")
        return round(value, 2) if value != float("inf") else None

    return {
        "steady_posts": len(raws),
        "steady_accepted": len(ids),
        "steady_errors": posted.errors,
        "steady_not_replicated": sum(x == float("inf") for x in latencies),
        "post_to_replicated_p50_s": q(0.5),
        "post_to_replicated_p95_s": q(0.95),
        "post_to_replicated_p99_s": q(0.99),
        "post_to_replicated_max_s": q(1.0),
        "steady_drain_runs": len(drains),
        "steady_drain_batches": sum(r[1] for r in drains),
        "steady_drain_run_mean_s": round(sum(r[2] for r in drains) / len(drains), 2) if drains else None,
        "steady_drain_run_max_s": round(max(r[2] for r in drains), 2) if drains else None,
        "steady_run_to_replicated_mean_s": round(sum(r[3] for r in drains) / len(drains), 2) if drains else None,
        "steady_generator_lag_p99_ms": round(1000 * sorted(posted.lags)[int(0.99 * len(posted.lags))], 2),
    }


# --- the sweep: which batch caps drain fastest through the link -------------------------------------


def describe(limits: BatchLimits) -> str:
    return f"{limits.transactions:,} txns / {limits.records:,} records / {limits.bytes // 2**20} MiB"


class Watch:
    """What one drain costs beside its time: the peak RSS of this process above its RSS before (sampled every
    ``every_s``), and the longest single Redis call (from the SLOWLOG, calls over ``SLOW_US``)."""

    SLOW_US = 1000

    def __init__(self, client: redis.Redis, every_s: float = 0.02):
        self.client, self.every_s = client, every_s
        self.process = psutil.Process()
        self.peak = self.before = 0
        self.stopping = threading.Event()

    @contextmanager
    def watching(self) -> Iterator["Watch"]:
        self.client.config_set("slowlog-log-slower-than", self.SLOW_US)
        self.client.config_set("slowlog-max-len", 10_000)
        self.client.slowlog_reset()
        self.before = self.peak = self.process.memory_info().rss
        self.stopping.clear()
        sampler = threading.Thread(target=self.sample, name="rss-sampler", daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self.stopping.set()
            sampler.join()

    def sample(self) -> None:
        while not self.stopping.wait(self.every_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def rss_growth_mib(self) -> float:
        return round((self.peak - self.before) / 2**20, 1)

    def longest_call(self) -> tuple[float, str]:
        """(ms, command) of the longest logged call since :meth:`watching` began; (0, "") when none took 1 ms."""
        entries = self.client.slowlog_get(10_000)
        if not entries:
            return 0.0, ""
        worst = max(entries, key=lambda e: e["duration"])
        command = worst["command"]
        return round(worst["duration"] / 1000, 1), (command.decode() if isinstance(command, bytes) else str(command)).split(" ")[0]


def sweep_small(
    site, far: Engine, primary: Engine, replica: Engine, plan: Planning, start: datetime, txns: int, limits: BatchLimits
) -> dict:
    """``txns`` single-record transactions to ``replicated`` through the link, as DAG runs do it, at ``limits``."""
    buffer = Buffer(redis_client(site), prefix=f"bench-sweep-small-{uuid.uuid4().hex[:6]}")
    buffer_small(buffer, Workload(plan, start), txns)
    truncate(primary)
    quiesce(primary, replica)
    with Watch(buffer.client).watching() as watch:
        cycles = drain_to_replicated(buffer, far, replica, limits)
    assert cycles.summary.applied == txns and not cycles.summary.dead_lettered, cycles.summary.describe()
    longest_ms, longest = watch.longest_call()
    return {
        "small_batches": cycles.summary.batches,
        "small_txns_per_batch": round(txns / cycles.summary.batches),
        "small_drain_txns_per_s": round(txns / cycles.drain_s),
        "small_replicated_txns_per_s": round(txns / cycles.replicated_s),
        "small_rss_growth_mib": watch.rss_growth_mib(),
        "small_longest_redis_call_ms": longest_ms,
        "small_longest_redis_call": longest,
    }


def sweep_mixed(
    site, far: Engine, primary: Engine, replica: Engine, plan: Planning, start: datetime, records: int, limits: BatchLimits
) -> dict:
    """``records`` records of the peak mix (observations with package and files, housekeeping lists) through the link."""
    buffer = Buffer(redis_client(site), prefix=f"bench-sweep-mixed-{uuid.uuid4().hex[:6]}")
    mixed = buffer_records(buffer, Workload(plan, start), records)
    truncate(primary)
    quiesce(primary, replica)
    with Watch(buffer.client).watching() as watch:
        summary = drain_everything(buffer, far, limits)
        confirm_everything(buffer, replica)
    assert summary.applied == len(mixed.txns) and not summary.dead_lettered, summary.describe()
    longest_ms, longest = watch.longest_call()
    return {
        "mixed_batches": summary.batches,
        "mixed_records_per_batch": round(records / summary.batches),
        "mixed_txns_per_batch": round(len(mixed.txns) / summary.batches),
        "mixed_records_per_s": round(records / summary.elapsed_s),
        "mixed_rss_growth_mib": watch.rss_growth_mib(),
        "mixed_longest_redis_call_ms": longest_ms,
        "mixed_longest_redis_call": longest,
    }


def sweep(
    site,
    primary_url: str,
    primary: Engine,
    replica: Engine,
    plan: Planning,
    start: datetime,
    console: Console,
    size: "Size",
    configured: BatchLimits,
) -> dict:
    """Each candidate of ``size.sweep`` (and the configured limits), both phases, through one 250 ms link, in one run."""
    candidates = list(dict.fromkeys([*SWEEP[: size.sweep_candidates], configured]))
    results = []
    with WanProxy("127.0.0.1", site.primary.port, delay_s=WAN_ONE_WAY_S) as wan:
        far = engine(primary_url, wan.port, autocommit=True)
        try:
            with far.connect():  # connected once per drain task: not part of the rate
                pass
            for index, limits in enumerate(candidates):
                console.print(
                    f"sweep {index + 1}/{len(candidates)}: {describe(limits)}: {size.sweep_txns:,} single-record "
                    f"transactions, then {size.sweep_records:,} records of the peak mix, through the link …"
                )
                when = start + timedelta(days=90 + 10 * index)
                row = {
                    "transactions": limits.transactions,
                    "records": limits.records,
                    "bytes": limits.bytes,
                    "configured": limits == configured,
                }
                row |= sweep_small(site, far, primary, replica, plan, when, size.sweep_txns, limits)
                row |= sweep_mixed(site, far, primary, replica, plan, when + timedelta(days=5), size.sweep_records, limits)
                results.append(row)
        finally:
            far.dispose()
    truncate(primary)
    quiesce(primary, replica)
    chosen = next(r for r in results if r["configured"])
    label = lambda r: f"{r['transactions']}/{r['records']}/{r['bytes']}"  # noqa: E731
    return {
        "sweep": results,
        "sweep_configured": label(chosen),
        "sweep_configured_small_replicated_txns_per_s": chosen["small_replicated_txns_per_s"],
        "sweep_configured_mixed_records_per_s": chosen["mixed_records_per_s"],
        "sweep_best_small": label(max(results, key=lambda r: r["small_replicated_txns_per_s"])),
        "sweep_best_mixed": label(max(results, key=lambda r: r["mixed_records_per_s"])),
        "sweep_longest_redis_call_ms": max(max(r["small_longest_redis_call_ms"], r["mixed_longest_redis_call_ms"]) for r in results),
        "sweep_max_rss_growth_mib": max(max(r["small_rss_growth_mib"], r["mixed_rss_growth_mib"]) for r in results),
    }


# --- the run -----------------------------------------------------------------------------------------


def positive(text: str) -> int:
    """A batch cap: a whole number above zero (argparse names the option when this refuses)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full", help="smoke: every phase, on little data (default full)")
    parser.add_argument("--records", type=int, help=f"records drained locally (full: {SIZES['full'].records:,})")
    parser.add_argument("--wan-records", type=int, help=f"records drained at 250 ms RTT (full: {SIZES['full'].wan_records:,})")
    parser.add_argument("--small-txns", type=int, help=f"single-record transactions at 250 ms RTT (full: {SIZES['full'].small_txns:,})")
    parser.add_argument("--steady-seconds", type=int, help=f"steady ingest phase (full: {SIZES['full'].steady_seconds})")
    parser.add_argument(
        "--sweep-txns", type=int, help=f"single-record transactions per sweep candidate (full: {SIZES['full'].sweep_txns:,})"
    )
    parser.add_argument("--sweep-records", type=int, help=f"peak-mix records per sweep candidate (full: {SIZES['full'].sweep_records:,})")
    parser.add_argument("--sweep-candidates", type=int, help=f"how many of the sweep's candidates (full: {len(SWEEP)})")
    configured = BatchSettings()  # OPSYNC_DRAIN_BATCH_* or the product's defaults
    parser.add_argument(
        "--batch",
        type=positive,
        default=configured.batch_size,
        help=f"transactions per batch (OPSYNC_DRAIN_BATCH_SIZE: {configured.batch_size})",
    )
    parser.add_argument(
        "--batch-records",
        type=positive,
        default=configured.batch_records,
        help=f"records per batch at most (OPSYNC_DRAIN_BATCH_RECORDS: {configured.batch_records})",
    )
    parser.add_argument(
        "--batch-bytes",
        type=positive,
        default=configured.batch_bytes,
        help=f"envelope bytes per batch at most (OPSYNC_DRAIN_BATCH_BYTES: {configured.batch_bytes})",
    )
    parser.set_defaults(**asdict(SIZES[parser.parse_known_args()[0].size]))
    args = parser.parse_args()
    records, wan_records = args.records, args.wan_records
    limits = BatchLimits(args.batch, args.batch_records, args.batch_bytes)
    console = Console(stderr=True)
    figures: dict[str, float | int | bool | None] = {}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opsync-bench-logs-")))
        console.print("[bold]starting[/] Redis (appendfsync always) and PostgreSQL primary + replica …")
        site = stack.enter_context(ingest_bench.services())
        primary_url = site.primary.url()
        primary, replica = engine(primary_url), engine(site.replica.url())
        stack.callback(primary.dispose)
        stack.callback(replica.dispose)
        plan = planning(primary)
        start = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)

        # 1. drain locally, then confirm on the replica
        buffer = Buffer(redis_client(site), prefix="bench-drain")
        console.print(f"buffering {records:,} records (build_transaction + Buffer.enqueue) …")
        local = buffer_records(buffer, Workload(plan, start), records)
        quiesce(primary, replica)
        console.print(f"draining {len(local.txns):,} transactions into the primary, batches of {describe(limits)} …")
        with Parts().watching(buffer) as parts:
            summary = drain_everything(buffer, primary, limits)
        confirmed, confirm_s = confirm_everything(buffer, replica)
        assert summary.applied == len(local.txns) and not summary.dead_lettered, summary.describe()
        drained_rows = count_rows(primary)
        assert drained_rows == records, f"{drained_rows} rows in the primary, {records} expected"

        # 2. baseline: the same rows by raw COPY into the emptied tables
        rows = local.rows()
        truncate(primary)
        quiesce(primary, replica)
        console.print("baseline: the same rows by one raw COPY per table in one DB transaction …")
        copy_s = copy_load(site.primary.conninfo(), rows)
        assert count_rows(primary) == records
        truncate(primary)
        quiesce(primary, replica)

        # 3. the same drain through 250 ms round trips
        wan_buffer = Buffer(redis_client(site), prefix="bench-drain-wan")
        console.print(f"buffering {wan_records:,} more records …")
        wan_set = buffer_records(wan_buffer, Workload(plan, start + timedelta(days=30)), wan_records)
        quiesce(primary, replica)
        with WanProxy("127.0.0.1", site.primary.port, delay_s=WAN_ONE_WAY_S) as wan:
            far = engine(primary_url, wan.port, autocommit=True)
            try:
                console.print("draining them through the WAN proxy (250 ms round trips) …")
                connect_started = time.perf_counter()
                with far.connect():  # the hook's engine connects once per task: timed apart
                    pass
                wan_connect_s = time.perf_counter() - connect_started
                wan_summary = drain_everything(wan_buffer, far, limits)
            finally:
                far.dispose()
        assert wan_summary.applied == len(wan_set.txns) and not wan_summary.dead_lettered, wan_summary.describe()
        confirm_everything(wan_buffer, replica)

        # 4. single-record transactions to replicated, through the same link
        figures |= small_txns(site, primary_url, primary, replica, plan, start + timedelta(days=60), console, args.small_txns, limits)

        # 5. POST to replicated at a steady rate
        figures |= steady_ingest(site, primary_url, primary, replica, workdir, console, args.steady_seconds, limits)

        # 6. the sweep of batch caps, both kinds of backlog, through the link
        size = Size(**{name: getattr(args, name) for name in Size.__dataclass_fields__})
        figures |= sweep(site, primary_url, primary, replica, plan, start + timedelta(days=120), console, size, limits)

    drain_rate, copy_rate = records / summary.elapsed_s, records / copy_s
    wan_rate = wan_records / wan_summary.elapsed_s
    figures = {
        "records": records,
        "transactions": len(local.txns),
        "batch_size": limits.transactions,
        "batch_records": limits.records,
        "batch_bytes": limits.bytes,
        "buffer_records_per_s": round(local.records / local.seconds),
        "drain_s": round(summary.elapsed_s, 2),
        "drain_records_per_s": round(drain_rate),
        "drain_batches": summary.batches,
        "round_trips_per_batch": round(summary.round_trips / summary.batches, 2),
        **{f"drain_share_{name}": share for name, share in parts.shares(summary.elapsed_s).items()},
        "drain_client_cpu_s": round(sum(parts.cpu.values()), 2),
        "drain_apply_client_cpu_s": round(parts.cpu["apply"], 2),
        "drain_apply_wait_s": round(parts.seconds["apply"] - parts.cpu["apply"], 2),
        "confirm_s": round(confirm_s, 2),
        "confirmed_txns": confirmed,
        "copy_s": round(copy_s, 2),
        "copy_records_per_s": round(copy_rate),
        "drain_vs_copy": round(drain_rate / copy_rate, 3),
        "wan_records": wan_records,
        "wan_transactions": len(wan_set.txns),
        "wan_batches": wan_summary.batches,
        "wan_round_trips_per_batch": round(wan_summary.round_trips / wan_summary.batches, 2),
        "wan_connect_s": round(wan_connect_s, 2),
        "drain_s_250ms_rtt": round(wan_summary.elapsed_s, 2),
        "drain_records_per_s_250ms_rtt": round(wan_rate),
        "drain_records_per_s_250ms_rtt_with_connect": round(wan_records / (wan_summary.elapsed_s + wan_connect_s)),
        **figures,
        "target_drain_vs_copy": TARGET_DRAIN_VS_COPY,
        "target_records_per_s_250ms_rtt": TARGET_WAN_RECORDS_PER_S,
        "target_post_to_replicated_p95_s": TARGET_P95_S,
    }
    p95 = figures["post_to_replicated_p95_s"]
    figures["drain_vs_copy_target_met"] = figures["drain_vs_copy"] >= TARGET_DRAIN_VS_COPY
    figures["wan_target_met"] = wan_rate >= TARGET_WAN_RECORDS_PER_S
    figures["p95_target_met"] = p95 is not None and p95 <= TARGET_P95_S and figures["steady_errors"] == 0

    table = Table("figure", "value", "target", "met")
    yes = {True: "[green]yes[/]", False: "[red]no[/]"}
    table.add_row("drain records/s (local)", f"{drain_rate:,.0f}", "", "")
    table.add_row("raw COPY records/s", f"{copy_rate:,.0f}", "", "")
    table.add_row(
        "drain / COPY", f"{figures['drain_vs_copy']:.0%}", f"≥ {TARGET_DRAIN_VS_COPY:.0%}", yes[figures["drain_vs_copy_target_met"]]
    )
    table.add_row("round trips per batch", f"{figures['round_trips_per_batch']:g}", "constant", "")
    table.add_row("confirm on the replica", f"{confirm_s:.2f} s ({confirmed:,} txns)", "", "")
    table.add_row("drain records/s, 250 ms RTT", f"{wan_rate:,.0f}", f"≥ {TARGET_WAN_RECORDS_PER_S:,}", yes[figures["wan_target_met"]])
    table.add_row(
        "  same, with the connection set-up",
        f"{figures['drain_records_per_s_250ms_rtt_with_connect']:,} ({wan_connect_s:.1f} s to connect)",
        "",
        "",
    )
    table.add_row(
        "single-record txns/s to replicated, 250 ms RTT",
        f"{figures['small_replicated_txns_per_s']:,} "
        f"(drain {figures['small_drain_txns_per_s']:,}/s, raw COPY {figures['small_copy_rows_per_s']:,} rows/s)",
        "",
        "",
    )
    table.add_row(
        "  48-hour backlog to replicated",
        f"{figures['small_projected_48h_min']} min",
        f"≤ {TARGET_OUTAGE_MIN} min",
        yes[figures["small_target_met"]],
    )
    table.add_row(f"POST→replicated p95 at {STEADY_RATE}/s", f"{p95} s", f"≤ {TARGET_P95_S:g} s", yes[figures["p95_target_met"]])
    console.print(table)
    if (longest := figures["steady_drain_run_max_s"]) and longest > LONG_RUN_S:
        console.print(
            f"[yellow]note[/]: one drain run of the steady phase lasted {longest} s: a run ends at its first batch that "
            f"is not full, so the drainer could not keep up with {STEADY_RATE} records/s through the 250 ms link"
        )
    sweep_table = Table("caps: txns / records / MiB", "1-record txn/s", "txn/batch", "mix rec/s", "rec/batch", "+RSS MiB", "Redis ms")
    for row in figures["sweep"]:
        sweep_table.add_row(
            f"{row['transactions']:,} / {row['records']:,} / {row['bytes'] // MIB}" + (" (configured)" if row["configured"] else ""),
            f"{row['small_replicated_txns_per_s']:,}",
            f"{row['small_txns_per_batch']:,}",
            f"{row['mixed_records_per_s']:,}",
            f"{row['mixed_records_per_batch']:,}",
            f"{max(row['small_rss_growth_mib'], row['mixed_rss_growth_mib']):g}",
            f"{max(row['small_longest_redis_call_ms'], row['mixed_longest_redis_call_ms']):g}",
        )
    console.print(sweep_table)
    console.print(
        "drain time by part: "
        + ", ".join(f"{name} {parts.seconds[name]:.2f} s" for name in Parts.NAMES)
        + f" (of {summary.elapsed_s:.2f} s); this process's CPU {sum(parts.cpu.values()):.2f} s, apply waiting on the primary "
        f"{figures['drain_apply_wait_s']:.2f} s"
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
