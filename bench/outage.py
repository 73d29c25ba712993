"""``make bench-outage``: a whole link outage at the README's peak load, buffered, survived and drained, end to end.

It starts its own services in a temporary directory (:func:`ingest.services`: a durable Redis with
``appendfsync always`` and its production ``maxmemory``, a migrated PostgreSQL primary with its
streaming replica), the real ingest API under uvicorn (:func:`ingest.api_server`), a real
``datasette serve`` with the publisher inside (:func:`read.datasette`), and the link to the primary
as the WAN proxy (:class:`devstack.wan.WanProxy`, 250 ms round trips), then:

- idle: single-record POSTs at ``PROBE_RATE``/s, open loop, for ``idle_seconds``: the idle p99 (this probe, idle
  and while draining, posts from a process of its own, as a site's clients do: not sharing a GIL with the drain);
- the link is cut (``blackhole``) and the fill posts the README's peak workload for ``--hours``
  hours: 200 housekeeping sensors sampled every 10 s, each sample its own single-record POST
  (20/s), and ``OBS_PER_MINUTE`` executed observations a minute, each one ``POST /v1/transactions``
  with its raw data package and ``FILES_PER_OBS`` files (48 h: 3,456,000 + 8,640 transactions).
  Each request is built by :func:`opsync.client.write` (a fresh ``Idempotency-Key`` per call,
  the body as the client encodes it); an answer other than ``202`` is counted, not retried (nothing
  drains, so a refusal would stay one). Time is compressed: ``--rate 0`` (the default) sends as fast
  as the API answers, from ``FILL_SENDERS`` keep-alive connections; ``--rate R`` sends R/s on a
  fixed schedule from ``PROBE_SENDERS`` (latency from the scheduled time). Redis' RSS (its AOF-rewrite child's own
  pages added while one runs), memory and AOF size are sampled every ``SAMPLE_S`` meanwhile;
- with the buffer full, its depth against the API's entries high-water mark, and whether a mark
  (entries or memory) is passed, as backpressure judges it (the default mark, 5 % above 48 h at the
  peak, is never raised here: a 48 h fill that passes it shows as ``503`` answers in ``fill_errors``);
- then ``kill -9`` of redis-server, restarted on the same AOF; one POST is retried with its key
  until it gets a ``202``;
- baseline: every stream entry, as it is, ``XADD``-ed into a second Redis of the same configuration
  (memory, AOF, and its restart after ``kill -9``);
- the link returns at 250 ms RTT and a loop standing in for the DAG ``opsync_drain`` (bench-drain's
  :class:`drain.DagStandIn`: drain, wait for the replica, confirm; every 2 s, started when the link
  returns: while it is cut no run gets through) drains it, while ``PROBE_RATE``/s single-record
  POSTs go on (the ingest p99 while draining). The times from the link's return until the last
  transaction accepted before it is ``committed``, then ``replicated`` (stream order: everything
  before it is too; checked for every transaction at the end), and until Datasette counts every row
  of each table ``replicated`` (the probe stops once the fill is replicated; its rows are counted);
- memory held by Redis after that; every accepted row and transaction checked against the primary:
  lost (accepted, not there), duplicated (there, but not accepted), stuck
  (not ``replicated``, or still in the stream);
- baseline: the same rows, dumped from the primary, loaded by one raw ``COPY`` per table in one DB
  transaction through the same 250 ms link into the emptied tables.

``--size smoke`` does all of it on ~1,400 transactions in well under a minute, to show the
benchmark runs and prints every figure (``FIGURES``); its figures mean little and the targets (at
48 h) are not for it. ``--hours`` overrides the size's outage length.

Prints a summary, then one JSON line with every figure, last.
"""

import argparse
import asyncio
import json
import multiprocessing
import secrets
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httptools
import httpx
import psutil
import psycopg
import redis
import uvloop
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, make_url, text

from devstack.redis import RedisServer
from devstack.wan import WanProxy
from opsync.buffer import Buffer
from opsync.buffer.figures import buffer_stats
from opsync.client import encode, write
from opsync.config import Settings
from opsync.read_model.store import ReadModel
from opsync.stats import high_water

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drain as drain_bench  # noqa: E402  (bench/drain.py: workload, DAG stand-in, receipts, COPY helpers)
import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: services, API server, token)
import read as read_bench  # noqa: E402  (bench/read.py: datasette serve with the publisher)

SENSORS = 200  # housekeeping sensors, each sampled every 10 s: 20 single-record POSTs per second
SAMPLE_EVERY_S = 10
OBS_PER_MINUTE = 3  # "a few per minute": one observation per 400 housekeeping samples
FILES_PER_OBS = drain_bench.FILES_PER_OBS
TXNS_PER_HOUR = 3600 * SENSORS // SAMPLE_EVERY_S + 60 * OBS_PER_MINUTE
HK_PER_OBS = SENSORS * 60 // SAMPLE_EVERY_S // OBS_PER_MINUTE
FILL_SENDERS = 8
PROBE_RATE = 100  # single-record POSTs per second while idle and while draining
PROBE_SENDERS = 16
SAMPLE_S = 0.25  # Redis memory sampling
RTT_ONE_WAY_S = 0.125
POLL_S = 0.2
TIMEOUT_S = 10
RESTART_TIMEOUT_S = 3600
DATABASE = "opsync"
TIMEZONE = "America/Santiago"
TARGET_BYTES_PER_TXN, TARGET_RESTART_S, TARGET_REPLICATED_S = 1000, 30, 1800
TARGET_HELD_VS_PEAK, TARGET_DRAIN_P99_VS_IDLE = 0.25, 2.0


@dataclass(frozen=True)
class Size:
    hours: float
    idle_seconds: float
    drain_timeout_s: float


SIZES = {
    "full": Size(hours=48, idle_seconds=30, drain_timeout_s=4 * 3600),
    "smoke": Size(hours=0.02, idle_seconds=2, drain_timeout_s=90),
}
FIGURES = (
    "hours",
    "high_water_entries",
    "planned_txns",
    "buffered_depth",
    "high_water_share",
    "high_water_passed",
    "fill_txns",
    "fill_records",
    "fill_housekeeping_txns",
    "fill_observation_txns",
    "fill_errors",
    "fill_failures",
    "fill_s",
    "fill_txns_per_s",
    "compression",
    "fill_p50_ms",
    "fill_p99_ms",
    "idle_p50_ms",
    "idle_p99_ms",
    "drain_ingest_p50_ms",
    "drain_ingest_p99_ms",
    "drain_ingest_errors",
    "drain_p99_vs_idle",
    "redis_bytes",
    "bytes_per_txn",
    "bytes_per_record",
    "aof_bytes",
    "aof_bytes_per_txn",
    "aof_bytes_per_record",
    "aof_peak_bytes",
    "aof_rewrites",
    "maxmemory_bytes",
    "peak_used_memory_bytes",
    "peak_rss_bytes",
    "peak_rss_during_rewrite_bytes",
    "peak_rss_vs_maxmemory",
    "rss_samples",
    "rewrite_samples",
    "restart_redis_ready_s",
    "restart_s",
    "restart_failed_posts",
    "xadd_entries",
    "xadd_bytes_per_txn",
    "xadd_aof_bytes_per_txn",
    "xadd_restart_s",
    "bytes_vs_xadd",
    "restart_vs_xadd",
    "committed_after_link_s",
    "replicated_after_link_s",
    "datasette_replicated_after_link_s",
    "drain_runs",
    "drain_txns_per_s",
    "held_after_bytes",
    "held_after_vs_peak",
    "accepted_txns",
    "accepted_rows",
    "lost",
    "duplicated",
    "stuck",
    "copy_records",
    "copy_s_250ms_rtt",
    "copy_records_per_s_250ms_rtt",
    "drain_vs_copy",
    "target_bytes_per_txn",
    "target_restart_s",
    "target_replicated_after_link_s",
    "target_held_vs_peak",
    "target_drain_p99_vs_idle",
    "bytes_target_met",
    "restart_target_met",
    "replicated_target_met",
    "held_target_met",
    "drain_p99_target_met",
    "nothing_lost_target_met",
)


# --- the workload and its receipts --------------------------------------------------------------------


def raw_request(port: int, token: str, path: str, body) -> bytes:
    """The HTTP/1.1 bytes of the call :func:`opsync.client.write` builds (its fresh ``Idempotency-Key``, its encoding)."""
    call = write("POST", path, body, None)
    content = encode(call.body).encode()
    head = (
        f"POST {call.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in call.headers.items())
        + "\r\n"
    )
    return head.encode() + content


@dataclass(frozen=True)
class Item:
    tables: tuple[str, ...]  # of the steps, in order: the answer's ``ids`` are theirs
    raw: bytes


class Workload:
    """The README's peak: each sensor's sample a single-record POST; an observation transaction every ``HK_PER_OBS``."""

    def __init__(self, port: int, token: str, plan: drain_bench.Planning, start: datetime):
        self.port, self.token = port, token
        self.steps = drain_bench.Workload(plan, start)  # bench-drain's rows: sweeps of every sensor, observations

    def housekeeping(self) -> Iterator[Item]:
        while True:
            for step in self.steps.housekeeping(SENSORS):
                yield Item((step.table,), raw_request(self.port, self.token, f"/v1/records/{step.table}", step.values))

    def observation(self) -> Item:
        steps = self.steps.observation()
        body = {"steps": [step.model_dump(mode="json", exclude_none=True) for step in steps]}
        return Item(tuple(step.table for step in steps), raw_request(self.port, self.token, "/v1/transactions", body))

    def outage(self, hours: float) -> Iterator[Item]:
        """``hours`` of the peak in stream order; counts as the README gives them."""
        total, samples = round(hours * TXNS_PER_HOUR), self.housekeeping()
        for n in range(1, total + 1):
            yield self.observation() if n % (HK_PER_OBS + 1) == 0 else next(samples)


class Receipts:
    """What was accepted, kept on disk (millions of ids): rows as ``table<TAB>id`` lines, txn ids one a line."""

    def __init__(self, workdir: Path):
        self.rows_path, self.txns_path = workdir / "rows.tsv", workdir / "txns.txt"
        self.rows, self.txns = open(self.rows_path, "w"), open(self.txns_path, "w")
        self.per_table: Counter[str] = Counter()
        self.accepted = 0
        self.last: str | None = None

    def accept(self, item: Item, body: bytes) -> None:
        answer = json.loads(body)
        self.txns.write(answer["txn_id"] + "\n")
        for table, key in zip(item.tables, answer["ids"], strict=True):
            self.rows.write(f"{table}\t{key}\n")
            self.per_table[table] += 1
        self.accepted += 1
        self.last = answer["txn_id"]

    def txn_ids(self, chunk: int = 10_000) -> Iterator[list[str]]:
        self.txns.flush()
        with open(self.txns_path) as f:
            while lines := [line.strip() for _, line in zip(range(chunk), f, strict=False)]:
                yield lines


@dataclass
class Phase:
    latencies: array = field(default_factory=lambda: array("d"))
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def ms(self, q: float) -> float | None:
        values = sorted(self.latencies)
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 2) if values else None


async def send_all(port: int, items: Iterator[Item], receipts: Receipts, senders: int, rate: float) -> Phase:
    """``items`` from ``senders`` keep-alive connections: as fast as answered (``rate`` 0), or on a schedule of ``rate``/s
    with latency from the scheduled time (a stalled server is charged for the requests it delays)."""
    loop, phase = asyncio.get_running_loop(), Phase()
    numbered = enumerate(items)
    start = time.perf_counter() + 0.01

    async def sender() -> None:
        _, conn = await loop.create_connection(drain_bench.ReceiptConnection, "127.0.0.1", port)
        for index, item in numbered:
            began = time.perf_counter()
            if rate:
                began = start + index / rate
                if (wait := began - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
            try:
                status, body = await conn.send(item.raw, TIMEOUT_S)
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                phase.failures[type(exc).__name__] += 1
                conn.transport.abort()
                _, conn = await loop.create_connection(drain_bench.ReceiptConnection, "127.0.0.1", port)
                continue
            phase.latencies.append(time.perf_counter() - began)
            if status == 202:
                receipts.accept(item, body)
            else:
                phase.failures[str(status)] += 1
        conn.transport.close()

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(senders)))
    phase.seconds = time.perf_counter() - started
    return phase


def send(port: int, items: Iterator[Item], receipts: Receipts, senders: int, rate: float) -> Phase:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(send_all(port, items, receipts, senders, rate))
    finally:
        loop.close()


def until(stop: threading.Event, items: Iterator[Item]) -> Iterator[Item]:
    for item in items:
        if stop.is_set():
            return
        yield item


class Probe:
    """Single-record POSTs at ``PROBE_RATE``/s from ``go`` until ``stop``: the ingest latency, idle or while something
    else goes on, from a process of its own, as a site's clients are: in this one, the drain stand-in's threads would
    hold the probe's GIL, and its latencies would be theirs. Started ahead, so its imports are done before ``go``."""

    def __init__(self, port: int, workload: Workload, receipts: Receipts):
        context = multiprocessing.get_context("spawn")
        self.go, self.stop, self.receipts = context.Event(), context.Event(), receipts
        self.results, sending = context.Pipe(duplex=False)
        self.process = context.Process(target=probe_posts, args=(port, workload, self.go, self.stop, sending), name="probe", daemon=True)
        self.process.start()
        self.phase: Phase | None = None

    def join(self) -> None:
        """Its phase, and its accepted POSTs counted in ``receipts``; once stopped (again: nothing more)."""
        if self.phase is None:
            self.phase, accepted = self.results.recv()
            self.process.join()
            for item, body in accepted:
                self.receipts.accept(item, body)


class Accepted(list):
    """A probe process's answers, for its parent's :class:`Receipts`."""

    def accept(self, item: Item, body: bytes) -> None:
        self.append((Item(item.tables, b""), body))


def probe_posts(port: int, workload: Workload, go, stop, results) -> None:
    accepted = Accepted()
    go.wait()
    results.send((send(port, until(stop, workload.housekeeping()), accepted, PROBE_SENDERS, PROBE_RATE), accepted))


def probed(port: int, workload: Workload, receipts: Receipts, seconds: float) -> Phase:
    """The probe for ``seconds`` with nothing else going on: the idle latency, measured as the draining one is."""
    idle = Probe(port, workload, receipts)
    idle.go.set()
    time.sleep(seconds)
    idle.stop.set()
    idle.join()
    return idle.phase


def high_water_figures(client: redis.Redis, buffer: Buffer, planned: int, console: Console) -> dict:
    """With the buffer full: its depth against the API's entries mark, and whether a mark (entries or memory) is passed,
    as backpressure judges it (a 48 h outage at the peak should leave room: the default mark is 5 % above it)."""
    settings = Settings()
    fill = buffer_stats(client, buffer)
    reason = high_water(fill, settings)
    if reason:
        console.log(f"[yellow]note[/]: the buffer is past its high-water mark ({reason}); later POSTs got 503")
    return {
        "high_water_entries": settings.high_water_entries,
        "planned_txns": planned,
        "buffered_depth": fill.depth,
        "high_water_share": round(fill.depth / settings.high_water_entries, 4),
        "high_water_passed": reason is not None,
    }


# --- Redis: memory, AOF, restarts -------------------------------------------------------------------


def aof_bytes(server: RedisServer) -> int:
    """The AOF on disk: every file of Redis 7's append-only directory (base, increments, manifest)."""
    return sum(p.stat().st_size for p in (server.root / "data").rglob("*") if p.is_file() and "appendonly" in str(p))


def used_memory(client: redis.Redis) -> int:
    return client.info("memory")["used_memory"]


class Sampler(threading.Thread):
    """Redis' RSS, memory and AOF every ``SAMPLE_S``; while an AOF rewrite runs, its child's own (unshared) pages added."""

    def __init__(self, server: RedisServer):
        super().__init__(name="redis-sampler", daemon=True)
        self.server, self.stopping = server, threading.Event()
        self.client = server.client()
        self.peak_rss = self.peak_rewrite_rss = self.peak_used = self.peak_aof = 0
        self.samples = self.rewrite_samples = 0
        self.forks_before = self.forks()

    def forks(self) -> int:
        """Forks so far: with ``save ''`` each one is an AOF rewrite."""
        return self.client.info("stats")["total_forks"]

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            try:
                self.sample()
            except (redis.RedisError, psutil.Error, OSError):
                pass  # Redis restarting: the next sample sees the new one

    def sample(self) -> None:
        server = psutil.Process(self.server.pid)
        rss = server.memory_info().rss
        children = server.children()
        self.peak_rss = max(self.peak_rss, rss)
        if children:
            self.rewrite_samples += 1
            self.peak_rewrite_rss = max(self.peak_rewrite_rss, rss + sum(c.memory_full_info().uss for c in children))
        self.peak_used = max(self.peak_used, used_memory(self.client))
        self.peak_aof = max(self.peak_aof, aof_bytes(self.server))
        self.samples += 1


def restart_to_accepted(site, port: int, item: Item, receipts: Receipts) -> tuple[float, float | None, int]:
    """``kill -9`` Redis, start it on its AOF, retry one POST (same key) until ``202``: (s to Redis ready, s to the 202
    or None if none came within ``RESTART_TIMEOUT_S``, failed tries)."""
    head, _, content = item.raw.partition(b"\r\n\r\n")
    request_line, *lines = head.decode().split("\r\n")
    headers = {k: v for k, v in (line.split(": ", 1) for line in lines) if k not in ("Host", "Content-Length")}
    path = request_line.split(" ")[1]
    ready: list[float] = []
    site.redis.kill()
    killed = time.monotonic()
    starter = threading.Thread(target=lambda: (site.redis.start(timeout=3600), ready.append(time.monotonic() - killed)))
    starter.start()
    failed, accepted = 0, None
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT_S) as http:
        while time.monotonic() - killed < RESTART_TIMEOUT_S:
            try:
                answer = http.post(path, content=content, headers=headers)
                if answer.status_code == 202:
                    accepted = time.monotonic() - killed
                    receipts.accept(item, answer.content)
                    break
            except httpx.TransportError:
                pass
            failed += 1
            time.sleep(0.02)
    starter.join()
    return ready[0], accepted, failed


def xadd_baseline(site, workdir: Path, stream: str) -> dict:
    """Every entry of ``stream``, unchanged, ``XADD``-ed into an empty Redis of the same configuration; then its restart."""
    server = RedisServer(workdir / "xadd-redis", ingest_bench.free_port(), secrets.token_urlsafe(16))
    source, entries = drain_bench.redis_client(site), 0
    server.start()
    try:
        target = redis.Redis.from_url(server.url, socket_timeout=60)
        memory_before, aof_before = used_memory(target), aof_bytes(server)
        last = "-"
        while batch := source.xrange(stream, min=last, count=5000):
            batch = batch[1:] if last != "-" else batch
            if not batch:
                break
            pipe = target.pipeline(transaction=False)
            for _, fields in batch:
                pipe.xadd("bench:xadd", fields)
            pipe.execute()
            entries, last = entries + len(batch), batch[-1][0]
        memory, aof = used_memory(target) - memory_before, aof_bytes(server) - aof_before
        target.close()
        server.kill()
        started = time.monotonic()
        server.start(timeout=3600)
        restart_s = time.monotonic() - started
    finally:
        server.stop()
        source.close()
    return {
        "xadd_entries": entries,
        "xadd_bytes_per_txn": round(memory / max(entries, 1)),
        "xadd_aof_bytes_per_txn": round(aof / max(entries, 1)),
        "xadd_restart_s": round(restart_s, 2),
    }


# --- the drain and the checks -------------------------------------------------------------------------


def datasette_counts(http: httpx.Client) -> dict[str, int | None]:
    """Rows Datasette shows ``replicated``, per table (None when the count did not come back)."""
    counts = {}
    for table in drain_bench.DATA_TABLES:
        try:
            answer = http.get(f"/{DATABASE}/{table}.json", params={"_sync_state__exact": "replicated", "_size": 0})
            counts[table] = answer.json().get("filtered_table_rows_count") if answer.status_code == 200 else None
        except (httpx.TransportError, ValueError):
            counts[table] = None
    return counts


def state_of(buffer: Buffer, txn_id: str) -> str | None:
    status = buffer.status(txn_id)
    return status and status.get("state")


def checked(primary: Engine, receipts: Receipts, buffer: Buffer) -> dict:
    """Every accepted row against the primary (there, and nothing there that was not accepted: ids are primary keys),
    every accepted transaction ``replicated``, nothing left pending in the stream."""
    receipts.rows.flush()
    with primary.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE accepted_row (tbl text, id uuid) ON COMMIT DROP"))
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cursor, cursor.copy("COPY accepted_row (tbl, id) FROM STDIN") as copy, open(receipts.rows_path) as f:
            while block := f.read(1 << 20):
                copy.write(block)
        lost = duplicated = 0
        for table in drain_bench.DATA_TABLES:
            lost += conn.execute(
                text(f"SELECT count(*) FROM accepted_row a WHERE a.tbl = :t AND NOT EXISTS (SELECT 1 FROM {table} r WHERE r.id = a.id)"),
                {"t": table},
            ).scalar_one()
            duplicated += conn.execute(
                text(f"SELECT count(*) FROM {table} r WHERE NOT EXISTS (SELECT 1 FROM accepted_row a WHERE a.tbl = :t AND a.id = r.id)"),
                {"t": table},
            ).scalar_one()
    stuck = sum(not s or s.get("state") != "replicated" for chunk in receipts.txn_ids() for s in buffer.statuses(chunk))
    pending = buffer.client.xpending(buffer.stream, buffer.group)["pending"] if buffer.client.exists(buffer.stream) else 0
    return {"lost": lost, "duplicated": duplicated, "stuck": stuck + pending}


def copy_baseline(site, primary: Engine, workdir: Path) -> tuple[int, float]:
    """The rows now in the primary, dumped, the tables emptied, then one raw ``COPY`` per table in one DB transaction
    through the 250 ms link: (records, seconds from the first byte to the commit)."""
    dumps, records = {}, 0
    with psycopg.connect(site.primary.conninfo()) as conn:
        for table in drain_bench.DATA_TABLES:
            dumps[table] = workdir / f"{table}.copy"
            with conn.cursor().copy(f"COPY {table} TO STDOUT (FORMAT binary)") as copy, open(dumps[table], "wb") as f:
                for block in copy:
                    f.write(block)
            records += conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    drain_bench.truncate(primary)
    with WanProxy("127.0.0.1", site.primary.port, delay_s=RTT_ONE_WAY_S) as wan:
        conninfo = site.primary.conninfo().replace(f"port={site.primary.port}", f"port={wan.port}")
        with psycopg.connect(conninfo) as conn:
            started = time.perf_counter()
            with conn.cursor() as cursor:
                for table, path in dumps.items():
                    with cursor.copy(f"COPY {table} FROM STDIN (FORMAT binary)") as copy, open(path, "rb") as f:
                        while block := f.read(1 << 20):
                            copy.write(block)
            conn.commit()
            return records, time.perf_counter() - started


# --- the run -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full", help="smoke: every phase, on ~1,400 transactions (default full)")
    parser.add_argument("--hours", type=float, help="outage length at the peak (full: 48; smoke: 0.02)")
    parser.add_argument("--idle-seconds", type=float, help="of the idle probe (full: 30; smoke: 2)")
    parser.add_argument("--rate", type=float, default=0, help="fill POSTs per second (default 0: as fast as the API answers)")
    args = parser.parse_args()
    size = SIZES[args.size]
    hours = args.hours if args.hours is not None else size.hours
    idle_seconds = args.idle_seconds if args.idle_seconds is not None else size.idle_seconds
    console = Console(stderr=True, log_path=False)
    figures: dict = {"hours": hours}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opsync-bench-outage-")))
        console.log("[bold]starting[/] Redis (appendfsync always), PostgreSQL primary + replica, the API, Datasette …")
        site = stack.enter_context(ingest_bench.services())
        primary, replica = drain_bench.engine(site.primary.url()), drain_bench.engine(site.replica.url())
        stack.callback(primary.dispose)
        stack.callback(replica.dispose)
        plan = drain_bench.planning(primary)
        token = ingest_bench.replicated_token(primary, replica, tables=drain_bench.DATA_TABLES)
        api = stack.enter_context(ingest_bench.api_server(site, workdir / "api.log"))
        port = int(api.url.rsplit(":", 1)[1])
        ReadModel(workdir / "opsync.db", TIMEZONE).close()  # the file Datasette serves; the publisher in it fills it
        env = {**site.env, "OPSYNC_READ_MODEL_PATH": str(workdir / "opsync.db"), "OPSYNC_TIMEZONE": TIMEZONE}
        viewing = stack.enter_context(ExitStack())  # Datasette, stopped before the COPY baseline empties the tables
        datasette = viewing.enter_context(
            httpx.Client(
                base_url=viewing.enter_context(read_bench.datasette(workdir / "opsync.db", env, workdir / "datasette.log")), timeout=30
            )
        )
        wan = stack.enter_context(WanProxy("127.0.0.1", site.primary.port, delay_s=RTT_ONE_WAY_S))
        far_url = make_url(site.primary.url()).set(port=wan.port).render_as_string(hide_password=False)
        receipts = Receipts(workdir)
        start = datetime(2026, 11, 21, tzinfo=UTC)
        probes = Workload(port, token, plan, start)  # its own sensor names: no clash with the fill's samples
        # each probe process posts from a copy of its workload: its own sensor names too, so no sample is sent twice
        probing = lambda: Workload(port, token, plan, start)  # noqa: E731
        fill = Workload(port, token, plan, start)
        buffer = Buffer(drain_bench.redis_client(site))

        console.log(f"idle: {PROBE_RATE} single-record POSTs/s for {idle_seconds:g} s …")
        idle = probed(port, probing(), receipts, idle_seconds)

        wan.blackhole()
        client = drain_bench.redis_client(site)
        memory_before, aof_before = used_memory(client), aof_bytes(site.redis)
        figures["maxmemory_bytes"] = int(client.config_get("maxmemory")["maxmemory"])
        sampler = Sampler(site.redis)
        sampler.start()
        accepted_before, rows_before = receipts.accepted, sum(receipts.per_table.values())
        console.log(
            f"link cut; fill: {hours:g} h at the peak = {round(hours * TXNS_PER_HOUR):,} transactions "
            f"({'as fast as answered' if not args.rate else f'{args.rate:g}/s'}) …"
        )
        filled = send(port, fill.outage(hours), receipts, PROBE_SENDERS if args.rate else FILL_SENDERS, args.rate)
        forks = sampler.forks()
        fill_txns, fill_records = receipts.accepted - accepted_before, sum(receipts.per_table.values()) - rows_before
        memory, aof = used_memory(client) - memory_before, aof_bytes(site.redis) - aof_before
        console.log(
            f"filled: {fill_txns:,} transactions, {fill_records:,} records in {filled.seconds:.1f} s; "
            f"{memory / max(fill_txns, 1):,.0f} B of Redis memory per transaction"
        )

        figures |= high_water_figures(client, buffer, round(hours * TXNS_PER_HOUR) + round(PROBE_RATE * idle_seconds), console)
        console.log("kill -9 of redis-server with the buffer full, restart on its AOF, POST until 202 …")
        redis_ready_s, restart_s, failed_posts = restart_to_accepted(site, port, next(probes.housekeeping()), receipts)
        client = drain_bench.redis_client(site)
        last_before_link, accepted_at_link = receipts.last, receipts.accepted
        console.log("baseline: every stream entry XADD-ed into a second Redis, then its kill -9 and restart …")
        figures |= xadd_baseline(site, workdir, buffer.stream)

        buffer = Buffer(drain_bench.redis_client(site))
        console.log("link back at 250 ms RTT: draining, with single-record POSTs going on …")
        probe = Probe(port, probing(), receipts)
        dag = drain_bench.DagStandIn(buffer, far_url, replica)
        wan.restore()
        link_back = time.monotonic()
        dag.start()
        probe.go.set()
        committed_s = replicated_s = datasette_s = None
        deadline = link_back + size.drain_timeout_s
        while time.monotonic() < deadline and dag.error is None:
            if committed_s is None and state_of(buffer, last_before_link) in ("committed", "replicated"):
                committed_s = time.monotonic() - link_back
                console.log(f"  committed after {committed_s:.1f} s")
            if replicated_s is None and state_of(buffer, last_before_link) == "replicated":
                replicated_s = time.monotonic() - link_back
                console.log(f"  replicated after {replicated_s:.1f} s")
                probe.stop.set()
                probe.join()
            if replicated_s is not None:
                counts = datasette_counts(datasette)
                if all(counts[t] == receipts.per_table[t] for t in counts):
                    datasette_s = time.monotonic() - link_back
                    console.log(f"  Datasette shows every row replicated after {datasette_s:.1f} s")
                    break
            time.sleep(POLL_S)
        probe.stop.set()
        probe.join()
        dag.stopping.set()
        dag.join(120)
        if dag.error is not None:
            raise dag.error
        held = used_memory(client)
        sampler.stopping.set()
        sampler.join()
        figures |= checked(primary, receipts, buffer)
        viewing.close()
        console.log("baseline: the same rows by one raw COPY per table through the 250 ms link …")
        copy_records, copy_s = copy_baseline(site, primary, workdir)

    console.log("services stopped")
    during = probe.phase
    peak = max(sampler.peak_used, 1)
    drained = replicated_s and accepted_at_link / replicated_s
    idle_p99, drain_p99 = idle.ms(0.99), during.ms(0.99)
    figures |= {
        "fill_txns": fill_txns,
        "fill_records": fill_records,
        "fill_housekeeping_txns": fill_txns - fill.steps.observations,
        "fill_observation_txns": fill.steps.observations,
        "fill_errors": sum(filled.failures.values()),
        "fill_failures": dict(filled.failures),
        "fill_s": round(filled.seconds, 1),
        "fill_txns_per_s": round(fill_txns / filled.seconds),
        "compression": round(hours * 3600 / filled.seconds, 1),
        "fill_p50_ms": filled.ms(0.5),
        "fill_p99_ms": filled.ms(0.99),
        "idle_p50_ms": idle.ms(0.5),
        "idle_p99_ms": idle_p99,
        "drain_ingest_p50_ms": during.ms(0.5),
        "drain_ingest_p99_ms": drain_p99,
        "drain_ingest_errors": sum(during.failures.values()),
        "drain_p99_vs_idle": round(drain_p99 / idle_p99, 2) if drain_p99 and idle_p99 else None,
        "redis_bytes": memory,
        "bytes_per_txn": round(memory / max(fill_txns, 1)),
        "bytes_per_record": round(memory / max(fill_records, 1)),
        "aof_bytes": aof,
        "aof_bytes_per_txn": round(aof / max(fill_txns, 1)),
        "aof_bytes_per_record": round(aof / max(fill_records, 1)),
        "aof_peak_bytes": sampler.peak_aof,
        "aof_rewrites": forks - sampler.forks_before,
        "peak_used_memory_bytes": sampler.peak_used,
        "peak_rss_bytes": sampler.peak_rss,
        "peak_rss_during_rewrite_bytes": sampler.peak_rewrite_rss,
        "peak_rss_vs_maxmemory": round(max(sampler.peak_rss, sampler.peak_rewrite_rss) / figures["maxmemory_bytes"], 3),
        "rss_samples": sampler.samples,
        "rewrite_samples": sampler.rewrite_samples,
        "restart_redis_ready_s": round(redis_ready_s, 2),
        "restart_s": restart_s and round(restart_s, 2),
        "restart_failed_posts": failed_posts,
        "committed_after_link_s": committed_s and round(committed_s, 1),
        "replicated_after_link_s": replicated_s and round(replicated_s, 1),
        "datasette_replicated_after_link_s": datasette_s and round(datasette_s, 1),
        "drain_runs": sum(1 for run in dag.runs if run[0]),
        "drain_txns_per_s": drained and round(drained),
        "held_after_bytes": held,
        "held_after_vs_peak": round(held / peak, 3),
        "accepted_txns": receipts.accepted,
        "accepted_rows": sum(receipts.per_table.values()),
        "copy_records": copy_records,
        "copy_s_250ms_rtt": round(copy_s, 2),
        "copy_records_per_s_250ms_rtt": round(copy_records / copy_s),
        "drain_vs_copy": replicated_s and round(copy_s / replicated_s, 3),
    }
    figures["bytes_vs_xadd"] = round(figures["bytes_per_txn"] / max(figures["xadd_bytes_per_txn"], 1), 2)
    figures["restart_vs_xadd"] = restart_s and round(restart_s / max(figures["xadd_restart_s"], 0.01), 2)
    figures |= {
        "target_bytes_per_txn": TARGET_BYTES_PER_TXN,
        "target_restart_s": TARGET_RESTART_S,
        "target_replicated_after_link_s": TARGET_REPLICATED_S,
        "target_held_vs_peak": TARGET_HELD_VS_PEAK,
        "target_drain_p99_vs_idle": TARGET_DRAIN_P99_VS_IDLE,
        "bytes_target_met": figures["bytes_per_txn"] <= TARGET_BYTES_PER_TXN,
        "restart_target_met": restart_s is not None and restart_s <= TARGET_RESTART_S,
        "replicated_target_met": datasette_s is not None and datasette_s <= TARGET_REPLICATED_S,
        "held_target_met": figures["held_after_vs_peak"] <= TARGET_HELD_VS_PEAK,
        "drain_p99_target_met": figures["drain_p99_vs_idle"] is not None and figures["drain_p99_vs_idle"] <= TARGET_DRAIN_P99_VS_IDLE,
        "nothing_lost_target_met": figures["lost"] == figures["duplicated"] == figures["stuck"] == 0,
    }
    summary(console, figures)
    print(json.dumps(figures), flush=True)


def summary(console: Console, f: dict) -> None:
    yes = {True: "[green]yes[/]", False: "[red]no[/]"}
    table = Table("figure", "value", "baseline", "target", "met")
    table.add_row(
        "Redis memory per transaction",
        f"{f['bytes_per_txn']:,} B",
        f"XADD {f['xadd_bytes_per_txn']:,} B",
        f"≤ {TARGET_BYTES_PER_TXN:,} B",
        yes[f["bytes_target_met"]],
    )
    table.add_row("AOF per transaction", f"{f['aof_bytes_per_txn']:,} B", f"XADD {f['xadd_aof_bytes_per_txn']:,} B", "", "")
    table.add_row("peak RSS / maxmemory", f"{f['peak_rss_vs_maxmemory']:.1%}", "", "", "")
    table.add_row(
        "kill -9 to first 202",
        f"{f['restart_s']} s",
        f"XADD {f['xadd_restart_s']} s",
        f"≤ {TARGET_RESTART_S} s",
        yes[f["restart_target_met"]],
    )
    table.add_row(
        "link back to Datasette all replicated",
        f"{f['datasette_replicated_after_link_s']} s",
        f"COPY {f['copy_s_250ms_rtt']} s",
        f"≤ {TARGET_REPLICATED_S} s",
        yes[f["replicated_target_met"]],
    )
    table.add_row("held after / peak", f"{f['held_after_vs_peak']:.1%}", "", f"≤ {TARGET_HELD_VS_PEAK:.0%}", yes[f["held_target_met"]])
    table.add_row(
        "ingest p99 draining / idle",
        f"{f['drain_ingest_p99_ms']} / {f['idle_p99_ms']} ms",
        "",
        f"≤ {TARGET_DRAIN_P99_VS_IDLE:g}×",
        yes[f["drain_p99_target_met"]],
    )
    table.add_row(
        "lost / duplicated / stuck", f"{f['lost']} / {f['duplicated']} / {f['stuck']}", "", "0", yes[f["nothing_lost_target_met"]]
    )
    console.print(table)


if __name__ == "__main__":
    main()
