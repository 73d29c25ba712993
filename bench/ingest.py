"""``make bench-ingest``: how fast the ingest API answers on this machine, next to its limits.

It starts its own services in a temporary directory (a durable Redis with ``appendfsync always``,
a migrated PostgreSQL primary with its streaming replica) and the real API as a subprocess, with
the command ``make up`` uses (:func:`devstack.local.api_command`: its workers, no access log,
uvloop and httptools picked automatically), so the load generator never shares the API's CPU or GIL.

- Single-record POSTs at fixed open-loop rates. Sends are scheduled at fixed times and latency
  is measured from the scheduled time, so a stalled server is charged for every request it
  delays (no coordinated omission). The generator is a bare HTTP/1.1 keep-alive client on uvloop
  parsing only the status line with httptools; its own lag is reported to show it kept up.
- Batch POSTs of ``BATCH`` records from a few concurrent senders: records per second.
- The limit: pipelined ``XADD`` with redis-py to the same Redis of one-record envelopes, the size
  the API writes for one record: what buffering costs when each record is its own entry, without
  validation, overlay or HTTP (``xadd_limit_records_per_s``). A batch POST packs its records into
  one entry and can go past that; the packed rate (``BATCH`` records per entry) is reported too.
- Without opsync: one ``INSERT`` and commit into the primary through a 250 ms round-trip link.
- The floor (``bench/floor.py``): the same 1,000/s against an app served as the API is that only
  makes one durable Redis write per request: what this machine allows at that moment, so a p99
  can be told apart from a busy neighbour (``floor_p99_ms_at_1000``).
- Capacity, API next to the floor: CPU per request (user + system of the uvicorn processes and of
  ``redis-server``, over a fixed number of requests at ``CPU_RATE``, which both sustain), and the
  highest offered rate each sustains open loop with p99 <= 10 ms and no error. That rate is
  searched (doubling from ``SEARCH_START``, then bisecting to ``SEARCH_RESOLUTION``; a rate fails
  after two missed tries in a row) with the two
  apps' steps alternating, so both see the same neighbours; their ratio is the API's capacity as a
  share of what one durable write over HTTP allows (``api_vs_floor_rate``). CPU per request is the
  steadier figure on a busy machine: a neighbour steals time, not work.

``--size smoke`` runs every phase for a second or so (a few WAN samples): it checks the benchmark
still runs and prints every figure (``FIGURES``), in well under a minute; its figures mean little.

Prints a summary, then one JSON line with every figure, last.
"""

import argparse
import asyncio
import gc
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httptools
import httpx
import psutil
import psycopg
import uvloop
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, insert
from sqlalchemy.exc import ProgrammingError

from devstack.local import api_command
from devstack.postgres import Credentials, PostgresServer, provision
from devstack.redis import RedisServer
from devstack.settings import REPO, StackSettings
from devstack.wan import WanProxy
from opsync.auth import AuthError, TokenVerifier, create_token
from opsync.buffer.codec import encode
from opsync.ingest import StepIn, build_transaction
from opsync.migrate import upgrade
from opsync_observatory.models import Instrument, InstrumentModule

TABLE = "housekeeping_sample"
RATES = (200, 500, 1000)  # single-record POSTs per second
FLOOR_RATE = 1000
CONNECTIONS = 128  # keep-alive connections of the open-loop generator; more are never needed below 1 s of stall
BATCH = 500
BATCH_SENDERS = 4
XADD_PIPELINE = 1000
WAN_ONE_WAY_S = 0.125  # 250 ms round trips
REQUEST_TIMEOUT_S = 10
TARGET_P99_MS, TARGET_BATCH_SHARE = 5.0, 0.30
CPU_RATE = 500  # requests per second while CPU per request is measured: well below either app's limit
CAPACITY_P99_MS, TARGET_CAPACITY_SHARE = 10.0, 0.5  # a rate is sustained with p99 <= 10 ms; the API >= 50 % of the floor's
SEARCH_START, SEARCH_RESOLUTION = 250, 0.1  # the first rate tried; the search stops when the bounds are within 10 %
SEARCH_MIN = 25  # below this rate the search gives up (0 reported): a p99 of a few dozen requests says nothing


@dataclass(frozen=True)
class Size:
    """How long each phase runs; the rates, and so the figures' names, are the same at every size."""

    rate_seconds: float = 10
    warmup_requests: int = 400
    batch_seconds: float = 8
    xadd_seconds: float = 3
    wan_samples: int = 30
    wan_connect_samples: int = 5
    cpu_requests: int = 5000  # per app
    search_seconds: float = 5  # per step of the capacity search
    search_steps: int = 14  # per app, at most (tries, retries included)
    search_rest_s: float = 1.0  # between steps: a server finishes what a missed step left, neighbours' bursts pass


SIZES = {
    "full": Size(),
    "smoke": Size(
        rate_seconds=1,
        warmup_requests=100,
        batch_seconds=1,
        xadd_seconds=0.5,
        wan_samples=3,
        wan_connect_samples=1,
        cpu_requests=300,
        search_seconds=0.5,
        search_steps=3,
        search_rest_s=0.1,
    ),
}
FIGURES = (
    "p50_ms_at_200",
    "p99_ms_at_200",
    "errors_at_200",
    "failures_at_200",
    "generator_lag_p99_ms_at_200",
    "p50_ms_at_500",
    "p99_ms_at_500",
    "errors_at_500",
    "failures_at_500",
    "generator_lag_p99_ms_at_500",
    "p50_ms_at_1000",
    "p99_ms_at_1000",
    "errors_at_1000",
    "failures_at_1000",
    "generator_lag_p99_ms_at_1000",
    "floor_p50_ms_at_1000",
    "floor_p99_ms_at_1000",
    "floor_errors_at_1000",
    "floor_failures_at_1000",
    "floor_generator_lag_p99_ms_at_1000",
    "batch_records_per_s",
    "batch_errors",
    "batch_failures",
    "xadd_limit_records_per_s",
    "xadd_packed_records_per_s",
    "batch_vs_limit",
    "direct_wan_p50_ms",
    "direct_wan_p99_ms",
    "direct_wan_connect_p50_ms",
    "target_p99_ms_at_1000",
    "target_batch_vs_limit",
    "p99_target_met",
    "batch_target_met",
    "api_cpu_us_per_request",
    "api_server_cpu_us_per_request",
    "api_redis_cpu_us_per_request",
    "floor_cpu_us_per_request",
    "floor_server_cpu_us_per_request",
    "floor_redis_cpu_us_per_request",
    "api_vs_floor_cpu",
    "api_max_rate_per_s",
    "api_max_rate_p99_ms",
    "api_max_rate_generator_lag_p99_ms",
    "api_search_steps",
    "floor_max_rate_per_s",
    "floor_max_rate_p99_ms",
    "floor_max_rate_generator_lag_p99_ms",
    "floor_search_steps",
    "api_vs_floor_rate",
    "capacity_p99_ms",
    "target_api_vs_floor_rate",
    "api_vs_floor_rate_target_met",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Site:
    redis: RedisServer
    primary: PostgresServer
    replica: PostgresServer

    @property
    def env(self) -> dict[str, str]:
        return {
            "OPSYNC_PRIMARY_URL": self.primary.url(),
            "OPSYNC_REPLICA_URL": self.replica.url(),
            "OPSYNC_REDIS_URL": self.redis.url,
        }


@contextmanager
def services() -> Iterator[Site]:
    """Redis and PostgreSQL as the tests build them: same code as ``make up``, free ports, a scratch dir."""
    root = Path(tempfile.mkdtemp(prefix="opsync-bench-"))
    root.chmod(0o755)  # the unprivileged PostgreSQL user must traverse it
    stack = StackSettings()
    credentials = Credentials(secrets.token_urlsafe(16), secrets.token_urlsafe(16))
    primary, replica = (
        PostgresServer(name, root / name, free_port(), stack.pg_bin, stack.pg_os_user, credentials) for name in ("primary", "replica")
    )
    site = Site(RedisServer(root / "redis", free_port(), secrets.token_urlsafe(16)), primary, replica)
    try:
        site.redis.start()
        provision(primary, replica)
        upgrade(primary.url())
        yield site
    finally:
        site.redis.stop()
        for server in (replica, primary):
            if server.pid() is not None:
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def served(command: Callable[[int], list[str]], site: Site, log_path: Path) -> Iterator[subprocess.Popen]:
    """The server ``command(port)`` starts, in its own process; yields it once ``/readyz`` answers."""
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command(port), env={**os.environ, **site.env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc.url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)


def api_server(site: Site, log_path: Path):
    """The API under uvicorn, as ``make up`` runs it; ready once Redis is durable."""
    workers = StackSettings().api_workers
    return served(lambda port: api_command("127.0.0.1", port, workers, log_path.parent / "api-metrics"), site, log_path)


def floor_server(site: Site, log_path: Path):
    """The floor (``bench/floor.py``): HTTP and one durable Redis write, served as the API is."""
    workers = StackSettings().api_workers
    return served(lambda port: [sys.executable, "-m", "bench.floor", "--port", str(port), "--workers", str(workers)], site, log_path)


def wait_ready(proc: subprocess.Popen, timeout_s: float = 30, url: str | None = None, what: str = "the ingest API") -> None:
    """Until ``url`` (the API's ``/readyz`` by default) answers 200; fails when ``proc`` exits or time is up."""
    url = url or f"{proc.url}/readyz"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready; see its log")
        time.sleep(0.1)


def instrument_module(primary: Engine) -> uuid.UUID:
    """The module the housekeeping samples belong to (a direct table, so it lives in the primary)."""
    with primary.begin() as conn:
        instrument = conn.execute(insert(Instrument).values(name="BENCH").returning(Instrument.id)).scalar_one()
        return conn.execute(
            insert(InstrumentModule).values(instrument_id=instrument, name="LFA").returning(InstrumentModule.id)
        ).scalar_one()


def replicated_token(primary: Engine, replica: Engine, timeout_s: float = 10, tables: tuple[str, ...] = (TABLE,)) -> str:
    """A token to write ``tables``, returned once the replica (where the API checks tokens) has it."""
    token = create_token(primary, f"bench-{uuid.uuid4()}", [f"write:{t}" for t in tables])
    verifier, deadline = TokenVerifier(replica, ttl_s=0), time.monotonic() + timeout_s
    while True:
        try:
            verifier.verify(token)
            return token
        except (AuthError, ProgrammingError):  # not there yet, or the migration itself not yet replayed
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Samples:
    """Records of the form a logger sends: one sensor of one module, one reading per millisecond."""

    def __init__(self, module_id: uuid.UUID):
        self.module_id = str(module_id)
        self.start = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)
        self.count = 0

    def record(self) -> dict:
        self.count += 1
        at = self.start + timedelta(milliseconds=self.count)
        return {
            "instrument_module_id": self.module_id,
            "sensor": "lfa_mixer_temperature",
            "sampled_at": at.isoformat(),
            "value": round(4.2 + (self.count % 97) / 1000, 4),
            "unit": "K",
        }

    def body(self, size: int | None = None) -> bytes:
        """One record, or a list of ``size`` records, as JSON."""
        payload = self.record() if size is None else [self.record() for _ in range(size)]
        return json.dumps(payload).encode()


@dataclass(frozen=True)
class Requests:
    """Raw HTTP/1.1 POSTs, built before the clock starts so the generator only writes bytes."""

    port: int
    token: str

    def post(self, body: bytes) -> bytes:
        head = (
            f"POST /v1/records/{TABLE} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
            f"Idempotency-Key: {uuid.uuid4()}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (as httpx or requests use one)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(exc)

    def on_message_complete(self) -> None:
        if self.response and not self.response.done():
            self.response.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("closed by the server"))

    def fail(self, exc: Exception) -> None:
        if self.response and not self.response.done():
            self.response.set_exception(exc)

    async def send(self, raw: bytes, timeout_s: float) -> int:
        """Write the request; return the response's status once it has fully arrived.

        The timeout is a timer on the response, not ``asyncio.wait_for``, which wraps each request
        in one more task: the generator shares the API's two cores, so its CPU is the API's latency.
        """
        loop = asyncio.get_running_loop()
        self.response = loop.create_future()
        timer = loop.call_later(timeout_s, self.fail, TimeoutError(f"no answer within {timeout_s} s"))
        self.transport.write(raw)
        try:
            return await self.response
        finally:
            timer.cancel()


class Pool:
    """Idle keep-alive connections; a request waits for one (that wait counts in its latency).

    The most recently used one first, as client pools do: connections left idle age out on the
    server (uvicorn closes them after 5 s) instead of being picked just as the server closes them.
    """

    def __init__(self, port: int):
        self.port = port
        self.idle: asyncio.LifoQueue[HttpConnection] = asyncio.LifoQueue()

    async def grow(self, size: int) -> None:
        for _ in range(size - self.idle.qsize()):
            await self.add()

    async def add(self) -> None:
        _, conn = await asyncio.get_running_loop().create_connection(HttpConnection, "127.0.0.1", self.port)
        self.idle.put_nowait(conn)

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().transport.close()

    async def send(self, raw: bytes) -> int:
        conn = await self.idle.get()
        if conn.transport.is_closing():  # uvicorn closes connections idle for 5 s (between phases)
            _, conn = await asyncio.get_running_loop().create_connection(HttpConnection, "127.0.0.1", self.port)
        try:
            status = await conn.send(raw, REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, httptools.HttpParserError):
            conn.transport.abort()
            await self.add()
            raise
        self.idle.put_nowait(conn)
        return status


@dataclass
class Run:
    """What one load phase measured; latencies and lags in seconds."""

    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    errors: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # what the errors were: status code or exception
    seconds: float = 0.0
    server_cpu: float = 0.0  # cores the API process used on average
    generator_cpu: float = 0.0  # cores this process used on average
    server_cpu_s: float = 0.0  # CPU seconds of the server's processes in all
    redis_cpu_s: float = 0.0  # CPU seconds of redis-server in all, when it was watched

    def ms(self, q: float, values: list[float] | None = None) -> float:
        values = sorted(self.latencies if values is None else values)
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 2) if values else float("nan")


def cpu_seconds(server: psutil.Process | None) -> float:
    """User + system CPU of a server: the API's uvicorn supervisor and every worker, or redis-server (0 for None)."""
    return sum(sum(p.cpu_times()[:2]) for p in (server, *server.children(recursive=True))) if server else 0.0


def measured(phase: Coroutine[None, None, Run], server: psutil.Process, loop, redis: psutil.Process | None = None) -> Run:
    """Run a load phase; its Run also gets the wall time and the CPU both sides (and ``redis``) spent,
    to tell a saturated server from a saturated generator.

    The generator's garbage collector is off meanwhile: this process holds SQLAlchemy, psycopg and
    rich, and a phase's thousands of tasks set off full collections that stopped the generator for
    up to a tenth of a second, which it charged to the API as latency (its lag showed it: p99 up
    to 33 ms at 1,000/s, even against a bare ASGI app that answers in 0.4 ms).
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    server_before, redis_before, own_before = cpu_seconds(server), cpu_seconds(redis), time.process_time()
    start = time.perf_counter()
    try:
        run = loop.run_until_complete(phase)
    finally:
        gc.enable()
        gc.unfreeze()
    run.seconds = time.perf_counter() - start
    run.server_cpu_s, run.redis_cpu_s = cpu_seconds(server) - server_before, cpu_seconds(redis) - redis_before
    run.server_cpu = run.server_cpu_s / run.seconds
    run.generator_cpu = (time.process_time() - own_before) / run.seconds
    return run


async def timed(pool: Pool, raw: bytes, scheduled: float, run: Run) -> None:
    run.lags.append(time.perf_counter() - scheduled)
    try:
        status = await pool.send(raw)
    except (OSError, TimeoutError, httptools.HttpParserError) as exc:
        status = type(exc).__name__
    if status == 202:
        run.latencies.append(time.perf_counter() - scheduled)
    else:
        run.errors += 1
        run.failures[str(status)] = run.failures.get(str(status), 0) + 1


async def open_loop(pool: Pool, raws: list[bytes], rate: float) -> Run:
    """Send ``raws`` at ``rate`` per second on a fixed schedule, whatever the answers do."""
    run, tasks = Run(), []
    start = time.perf_counter() + 0.01
    for index, raw in enumerate(raws):
        scheduled = start + index / rate
        if (wait := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(timed(pool, raw, scheduled, run)))
    await asyncio.gather(*tasks)
    return run


async def closed_loop(pool: Pool, raws: list[bytes], senders: int, seconds: float) -> Run:
    """``senders`` concurrent clients, each posting as soon as its previous answer came, for ``seconds``."""
    run, queue = Run(), iter(raws)
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        for raw in queue:
            await timed(pool, raw, time.perf_counter(), run)
            if time.perf_counter() > deadline:
                return

    await asyncio.gather(*(sender() for _ in range(senders)))
    return run


def rate_phase(pool: Pool, requests: Requests, samples: Samples, rate: int, seconds: float, server: psutil.Process, loop) -> Run:
    raws = [requests.post(samples.body()) for _ in range(round(rate * seconds))]
    return measured(open_loop(pool, raws, rate), server, loop)


@dataclass
class Target:
    """One app under load: its requests, its warm pool, its processes."""

    name: str
    requests: Requests
    pool: Pool
    server: psutil.Process


def cpu_per_request(target: Target, samples: Samples, count: int, redis: psutil.Process, loop) -> tuple[float, float]:
    """Microseconds of CPU per request, of the app's processes and of redis-server, over ``count``
    single-record POSTs at ``CPU_RATE``: a rate both apps sustain, so neither queues."""
    raws = [target.requests.post(samples.body()) for _ in range(count)]
    run = measured(open_loop(target.pool, raws, CPU_RATE), target.server, loop, redis)
    return 1e6 * run.server_cpu_s / count, 1e6 * run.redis_cpu_s / count


@dataclass
class Search:
    """The highest offered rate with p99 <= ``CAPACITY_P99_MS`` and no error: doubled from
    ``SEARCH_START`` until a rate fails, then bisected until the bounds are within ``SEARCH_RESOLUTION``.
    A rate fails when two tries in a row miss: one neighbour's burst on shared cores does not end the doubling."""

    max_steps: int
    passed: int = 0  # the highest rate sustained so far (0: none yet)
    failed: int | None = None  # the lowest rate not sustained so far
    best: Run | None = None  # the step at ``passed``
    steps: int = 0
    missed_once: int | None = None  # a rate whose last try missed, to be tried once more

    def next_rate(self) -> int | None:
        """The rate to try next, or None when the search is done."""
        if self.steps >= self.max_steps:
            return None
        if self.missed_once is not None:
            return self.missed_once
        if self.failed is None:
            return 2 * self.passed if self.passed else SEARCH_START
        rate = round((self.passed + self.failed) / 2)
        if self.failed - self.passed <= SEARCH_RESOLUTION * self.failed or rate < SEARCH_MIN:
            return None
        return rate

    def record(self, rate: int, run: Run) -> bool:
        self.steps += 1
        sustained = run.errors == 0 and run.ms(0.99) <= CAPACITY_P99_MS
        if sustained:
            self.passed, self.best, self.missed_once = rate, run, None
        elif self.missed_once == rate:
            self.failed, self.missed_once = rate, None
        else:
            self.missed_once = rate
        return sustained


def capacity_search(targets: list[Target], samples: Samples, size: Size, console: Console, loop) -> dict[str, Search]:
    """Each target's search, their steps alternating, so a neighbour's burst falls on both alike."""
    searches = {target.name: Search(size.search_steps) for target in targets}
    while True:
        pending = [(t, searches[t.name], rate) for t in targets if (rate := searches[t.name].next_rate()) is not None]
        if not pending:
            return searches
        for target, search, rate in pending:
            run = rate_phase(target.pool, target.requests, samples, rate, size.search_seconds, target.server, loop)
            verdict = "sustained" if search.record(rate, run) else "missed"
            console.print(
                f"  {target.name} at {rate}/s: p99 {run.ms(0.99)} ms, {run.errors} errors, "
                f"generator lag p99 {run.ms(0.99, run.lags)} ms: {verdict}"
            )
            time.sleep(size.search_rest_s)


def capacity_figures(cpu: dict[str, tuple[float, float]], searches: dict[str, Search]) -> dict:
    figures: dict[str, float | int | bool] = {}
    for name, (server_us, redis_us) in cpu.items():
        search = searches[name]
        best = search.best or Run()
        figures |= {
            f"{name}_cpu_us_per_request": round(server_us + redis_us, 1),
            f"{name}_server_cpu_us_per_request": round(server_us, 1),
            f"{name}_redis_cpu_us_per_request": round(redis_us, 1),
            f"{name}_max_rate_per_s": search.passed,
            f"{name}_max_rate_p99_ms": best.ms(0.99),
            f"{name}_max_rate_generator_lag_p99_ms": best.ms(0.99, best.lags),
            f"{name}_search_steps": search.steps,
        }
    ratio = figures["api_max_rate_per_s"] / figures["floor_max_rate_per_s"] if figures["floor_max_rate_per_s"] else float("nan")
    return figures | {
        "api_vs_floor_cpu": round(figures["api_cpu_us_per_request"] / figures["floor_cpu_us_per_request"], 2),
        "api_vs_floor_rate": round(ratio, 3),
        "capacity_p99_ms": CAPACITY_P99_MS,
        "target_api_vs_floor_rate": TARGET_CAPACITY_SHARE,
        "api_vs_floor_rate_target_met": ratio >= TARGET_CAPACITY_SHARE,
    }


def batch_phase(pool: Pool, requests: Requests, samples: Samples, seconds: float, server: psutil.Process, loop) -> Run:
    raws = [requests.post(samples.body(BATCH)) for _ in range(round(seconds * 100_000 / BATCH))]  # 100k records/s of headroom
    return measured(closed_loop(pool, raws, BATCH_SENDERS, seconds), server, loop)


def xadd_limit(site: Site, envelope: bytes, records_per_entry: int, seconds: float) -> tuple[float, float]:
    """Pipelined ``XADD`` of ``envelope`` with redis-py: (records per second, entries per second)."""
    client = site.redis.client()
    stream = f"bench:xadd:{uuid.uuid4().hex}"
    pipeline_size = max(1, XADD_PIPELINE // records_per_entry)
    entries, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        pipe = client.pipeline(transaction=False)
        for _ in range(pipeline_size):
            pipe.xadd(stream, {"txn": envelope})
        pipe.execute()
        entries += pipeline_size
    client.delete(stream)
    return entries * records_per_entry / elapsed, entries / elapsed


def envelope(samples: Samples, size: int) -> bytes:
    """A transaction envelope of ``size`` records, as the API would write it to the stream."""
    steps = [StepIn(table=TABLE, values=samples.record()) for _ in range(size)]
    return encode(build_transaction(steps, "bench", str(uuid.uuid4())))


def direct_over_wan(site: Site, samples: Samples, size: Size) -> tuple[list[float], list[float]]:
    """What a script would do without opsync: connect, and INSERT + COMMIT each record, over 250 ms round trips.

    Returns per-record latencies on an open connection and connection set-up times, in seconds.
    """
    records, connects = [], []
    with WanProxy("127.0.0.1", site.primary.port, delay_s=WAN_ONE_WAY_S) as wan:
        conninfo = site.primary.conninfo().replace(f"port={site.primary.port}", f"port={wan.port}")
        for _ in range(size.wan_connect_samples):
            start = time.perf_counter()
            psycopg.connect(conninfo).close()
            connects.append(time.perf_counter() - start)
        with psycopg.connect(conninfo) as conn:
            for _ in range(size.wan_samples):
                row = samples.record()
                start = time.perf_counter()
                conn.execute(
                    "INSERT INTO housekeeping_sample (id, instrument_module_id, sensor, sampled_at, value, unit)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (uuid.uuid4(), row["instrument_module_id"], row["sensor"], row["sampled_at"], row["value"], row["unit"]),
                )
                conn.commit()
                records.append(time.perf_counter() - start)
    return records, connects


def ms(values: list[float], q: float) -> float:
    return Run(latencies=values).ms(q)


def connected(server: subprocess.Popen, token: str, samples: Samples, warmup_requests: int, loop) -> tuple[Requests, Pool]:
    """Requests for ``server`` and a warm pool of connections to it (the first requests of a worker are slow)."""
    requests = Requests(int(server.url.rsplit(":", 1)[1]), token)
    pool = Pool(requests.port)
    loop.run_until_complete(pool.grow(CONNECTIONS))
    loop.run_until_complete(open_loop(pool, [requests.post(samples.body()) for _ in range(warmup_requests)], 400))
    return requests, pool


def add_row(table: Table, phase: str, run: Run, lags: bool = True) -> None:
    table.add_row(
        phase,
        str(len(run.latencies) + run.errors),
        f"{run.ms(0.5)}",
        f"{run.ms(0.99)}",
        f"{run.ms(1.0)}",
        str(run.errors),
        f"{run.server_cpu:.2f}",
        f"{run.ms(0.99, run.lags)}" if lags else "",
    )


def rate_figures(run: Run, suffix: str, prefix: str = "") -> dict:
    return {
        f"{prefix}p50_ms_{suffix}": run.ms(0.5),
        f"{prefix}p99_ms_{suffix}": run.ms(0.99),
        f"{prefix}errors_{suffix}": run.errors,
        f"{prefix}failures_{suffix}": run.failures,
        f"{prefix}generator_lag_p99_ms_{suffix}": run.ms(0.99, run.lags),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full", help="smoke: every phase, briefly (default full)")
    size = SIZES[parser.parse_args().size]
    console = Console(stderr=True)
    figures: dict[str, float | int | bool] = {}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opsync-bench-logs-")))
        console.print("[bold]starting[/] Redis (appendfsync always) and PostgreSQL primary + replica …")
        site = stack.enter_context(services())
        primary = create_engine(site.primary.url())
        stack.callback(primary.dispose)
        replica = create_engine(site.replica.url())
        stack.callback(replica.dispose)
        module = instrument_module(primary)
        samples = Samples(module)
        token = replicated_token(primary, replica)
        server = stack.enter_context(api_server(site, workdir / "api.log"))
        loop = uvloop.new_event_loop()
        stack.callback(loop.close)
        requests, pool = connected(server, token, samples, size.warmup_requests, loop)
        process = psutil.Process(server.pid)
        floor = stack.enter_context(floor_server(site, workdir / "floor.log"))
        floor_requests, floor_pool = connected(floor, token, samples, size.warmup_requests, loop)
        stack.callback(floor_pool.close)
        targets = [Target("api", requests, pool, process), Target("floor", floor_requests, floor_pool, psutil.Process(floor.pid))]

        table = Table("phase", "requests", "p50 ms", "p99 ms", "max ms", "errors", "server cores", "generator lag p99 ms")
        for rate in RATES:
            console.print(f"single-record POSTs at {rate}/s for {size.rate_seconds:g} s …")
            run = rate_phase(pool, requests, samples, rate, size.rate_seconds, process, loop)
            add_row(table, f"{rate}/s", run)
            figures |= rate_figures(run, f"at_{rate}")

        console.print(f"floor: {FLOOR_RATE}/s for {size.rate_seconds:g} s against bench/floor.py (HTTP and one durable EVALSHA) …")
        run = rate_phase(floor_pool, floor_requests, samples, FLOOR_RATE, size.rate_seconds, targets[1].server, loop)
        add_row(table, f"floor {FLOOR_RATE}/s", run)
        figures |= rate_figures(run, f"at_{FLOOR_RATE}", "floor_")

        redis = psutil.Process(site.redis.pid)
        cpu = {}
        for target in targets:
            console.print(f"CPU per request: {target.name}, {size.cpu_requests} requests at {CPU_RATE}/s …")
            cpu[target.name] = cpu_per_request(target, samples, size.cpu_requests, redis, loop)
        console.print(f"highest rate with p99 ≤ {CAPACITY_P99_MS:g} ms, {size.search_seconds:g} s per step, API and floor alternating …")
        figures |= capacity_figures(cpu, capacity_search(targets, samples, size, console, loop))

        console.print(f"batch POSTs of {BATCH} records, {BATCH_SENDERS} senders, {size.batch_seconds:g} s …")
        batch = batch_phase(pool, requests, samples, size.batch_seconds, process, loop)
        batch_rate = len(batch.latencies) * BATCH / batch.seconds
        add_row(table, f"batch x{BATCH}", batch, lags=False)
        console.print(table)

        console.print("baseline: pipelined XADD with redis-py …")
        xadd_limit_rate, _ = xadd_limit(site, envelope(samples, 1), 1, size.xadd_seconds)
        xadd_packed, _ = xadd_limit(site, envelope(samples, BATCH), BATCH, size.xadd_seconds)
        console.print("baseline: direct INSERT + COMMIT through a 250 ms round-trip link …")
        direct, connects = direct_over_wan(site, samples, size)

    figures |= {
        "batch_records_per_s": round(batch_rate),
        "batch_errors": batch.errors,
        "batch_failures": batch.failures,
        "xadd_limit_records_per_s": round(xadd_limit_rate),
        "xadd_packed_records_per_s": round(xadd_packed),
        "batch_vs_limit": round(batch_rate / xadd_limit_rate, 3),
        "direct_wan_p50_ms": ms(direct, 0.5),
        "direct_wan_p99_ms": ms(direct, 0.99),
        "direct_wan_connect_p50_ms": ms(connects, 0.5),
        "target_p99_ms_at_1000": TARGET_P99_MS,
        "target_batch_vs_limit": TARGET_BATCH_SHARE,
    }
    figures["p99_target_met"] = figures["p99_ms_at_1000"] <= TARGET_P99_MS and figures["errors_at_1000"] == 0
    figures["batch_target_met"] = figures["batch_vs_limit"] >= TARGET_BATCH_SHARE
    console.print(
        f"p99 at 1000/s: {figures['p99_ms_at_1000']} ms (target ≤ {TARGET_P99_MS}); batch: {figures['batch_records_per_s']} "
        f"records/s = {figures['batch_vs_limit']:.0%} of the XADD limit {figures['xadd_limit_records_per_s']}/s "
        f"(target ≥ {TARGET_BATCH_SHARE:.0%}); direct over the WAN: {figures['direct_wan_p50_ms']} ms per record; "
        f"the floor's p99 at {FLOOR_RATE}/s: {figures[f'floor_p99_ms_at_{FLOOR_RATE}']} ms; capacity at p99 ≤ {CAPACITY_P99_MS:g} ms: "
        f"API {figures['api_max_rate_per_s']}/s, floor {figures['floor_max_rate_per_s']}/s = {figures['api_vs_floor_rate']:.0%} "
        f"(target ≥ {TARGET_CAPACITY_SHARE:.0%}); CPU per request: API {figures['api_cpu_us_per_request']} µs, "
        f"floor {figures['floor_cpu_us_per_request']} µs (uvicorn processes and redis-server)"
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
