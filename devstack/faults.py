"""The faults the soak test injects into a running local site; each breaks one thing, waits, heals it, and says whether it bit.

Every fault returns once the site is whole again (a killed program running again, the link back),
so faults never pile up and a seed replays the same sequence; only a new round trip (250–500 ms)
stays until the next one, as the link's weather does. Processes are killed with SIGKILL by
pid: a program's whole process tree under supervisord (as a crash of that service would), or the
one process of a running drain task, found through Airflow's metadata DB and its process title.
Restarting killed programs is supervisord's job (``autorestart``); the faults only wait for it.

A fault counts as *effective* only when its effect was seen (:class:`Outcome`): a program died
while it had work in flight (records in the buffer, requests open, a deferred wait) and came back
in a new process; a reset or a cut hit at least one open connection; replay was paused while the
replica had WAL to replay; a new round trip was measured over the link. :meth:`Faults.schedule`
first runs every kind (Redis first, while the most is in flight) until it was effective, then
seeded rounds, so each run proves every kind whatever its seed and duration.
"""

import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psutil
import psycopg
import redis

from devstack.local import LocalStack
from devstack.wan import WanProxy
from opsync.buffer import Buffer

BASE_RTT_S = 0.25
RTT_RANGE_S = (0.25, 0.5)
DRAIN_DAG, DRAIN_TASK = "opsync_drain", "drain"
TASK_TITLE = "airflow worker -- "  # Airflow's process title of a running task (task_runner.startup)
PROGRAMS = (
    "primary",
    "replica",
    "redis",
    "ingest-api",
    "datasette",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
)
KINDS = (  # every kind of fault, as Faults.kinds() names them
    "kill_redis",
    "kill_ingest_api",
    "kill_scheduler",
    "kill_triggerer",
    "kill_publisher",
    "kill_drain_task",
    "restart_primary",
    "restart_replica",
    "replica_lag",
    "wan_latency",
    "wan_blackhole",
    "wan_reset",
)
FIRST = "kill_redis"  # first of the first round: the buffer is never fuller than while the writers start
FIRST_ROUND_TRIES = 3  # attempts per kind to see it effective before the run goes on without
WORK_WAIT_S = 15  # how long a fault waits for the work in flight its effect needs
Check = Callable[[], str | None]  # after a fault healed: what shows it took effect, or None


class FaultError(RuntimeError):
    """The site did not come back from a fault in time: the soak cannot go on."""


@dataclass
class Outcome:
    """What a fault did, and the effect it was seen to have (None: it bit nothing, and does not count as effective)."""

    detail: str
    effect: str | None


@dataclass
class Faults:
    stack: LocalStack
    wan: WanProxy
    rng: random.Random
    say: Callable[[str], None]
    requests_in_flight: Callable[[], int] = lambda: 0  # the writers' API requests now unanswered
    injected: Counter = field(default_factory=Counter)
    effective: Counter = field(default_factory=Counter)

    def kinds(self) -> dict[str, Callable[[], Outcome | None]]:
        """Each kind of fault by name; a fault returns what it did, or None when it found nothing to break."""
        return {
            "kill_redis": lambda: self.kill_program("redis", self.buffered, self.redis_keeps),
            "kill_ingest_api": lambda: self.kill_program("ingest-api", self.open_requests, self.api_answers),
            "kill_scheduler": lambda: self.kill_program("airflow-scheduler", self.buffered, self.new_job("SchedulerJob")),
            "kill_triggerer": self.kill_triggerer,
            "kill_publisher": lambda: self.kill_program("datasette", self.open_requests, self.read_model_written),
            "kill_drain_task": self.kill_drain_task,
            "restart_primary": lambda: self.stop_and_start("primary", self.buffered, self.primary_answers),
            "restart_replica": lambda: self.stop_and_start("replica", self.buffered, self.replica_streams),
            "replica_lag": self.replica_lag,
            "wan_latency": self.wan_latency,
            "wan_blackhole": self.wan_blackhole,
            "wan_reset": self.wan_reset,
        }

    def inject(self, kind: str) -> bool:
        """Inject one fault and heal it; False when there was nothing to break (no drain task ran)."""
        started = time.monotonic()
        outcome = self.kinds()[kind]()
        if outcome is None:
            self.say(f"fault {kind}: skipped, nothing to break now")
            return False
        self.injected[kind] += 1
        self.effective[kind] += outcome.effect is not None
        seen = f"effect: {outcome.effect}" if outcome.effect else "NO EFFECT SEEN: not counted as effective"
        self.say(f"fault {kind}: {outcome.detail}; {seen} ({time.monotonic() - started:.1f} s)")
        return True

    def first_round(self) -> list[str]:
        """Every kind once, Redis first, the rest in a seeded order."""
        rest = sorted(set(self.kinds()) - {FIRST})
        self.rng.shuffle(rest)
        return [FIRST, *rest]

    def schedule(self, until: float, gap_s: tuple[float, float]) -> None:
        """Every kind until it was effective (a few tries each), whenever ``until`` comes; then every kind
        in a seeded shuffled order, round after round, until the monotonic time ``until``."""
        deck, tries = self.first_round(), Counter()
        while deck:
            time.sleep(self.rng.uniform(*gap_s))
            kind = deck.pop(0)
            self.inject(kind)
            tries[kind] += 1
            if not self.effective[kind] and tries[kind] < FIRST_ROUND_TRIES:
                deck.append(kind)
        while True:
            time.sleep(self.rng.uniform(*gap_s))
            if time.monotonic() >= until:
                return
            if not deck:
                deck = sorted(self.kinds())
                self.rng.shuffle(deck)
            kind = deck.pop()
            if not self.inject(kind):
                deck.insert(0, kind)  # tried again at the end of this round

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind (every kind, including those never injected): injected, effective."""
        return {kind: {"injected": self.injected[kind], "effective": self.effective[kind]} for kind in sorted(KINDS)}

    # what a fault needs in flight, and what it leaves to see

    def buffer(self) -> Buffer:
        return Buffer(redis.Redis.from_url(self.stack.redis.url, socket_timeout=5))

    def buffered(self) -> str | None:
        """Records in the buffer not yet acknowledged by the drain (on their way to the primary)."""
        buffer = self.buffer()
        try:
            depth = buffer.depth()
        except redis.RedisError:
            return None
        finally:
            buffer.client.close()
        return f"{depth} records buffered" if depth else None

    def open_requests(self) -> str | None:
        count = self.requests_in_flight()
        return f"{count} write requests open" if count else None

    def await_work(self, work: Callable[[], str | None], timeout_s: float = WORK_WAIT_S) -> str | None:
        """``work``'s account of what is in flight, as soon as there is some (None: none came in time)."""
        return poll(work, timeout_s, every_s=0.2) or None

    def last_entry(self) -> str | None:
        buffer = self.buffer()
        try:
            return buffer.client.xinfo_stream(buffer.stream)["last-generated-id"].decode()
        except redis.RedisError:
            return None
        finally:
            buffer.client.close()

    def redis_keeps(self) -> Check:
        """The restarted Redis holds the stream up to its last entry before the kill (replayed from its AOF)."""
        before = self.last_entry()

        def kept() -> str | None:
            after = self.last_entry()  # None while Redis still loads its AOF
            if before is None or after is None or stream_id(after) < stream_id(before):
                return None
            return f"it came back from its AOF with the stream up to {before}"

        return lambda: poll(kept, 30)

    def api_answers(self) -> Check:
        url = f"http://{self.stack.settings.host}:{self.stack.settings.api_port}/healthz"
        return lambda: poll(lambda: http_ok(url) and "the new API process answers", 30)

    def new_job(self, job_type: str) -> Callable[[], Check]:
        """The restarted Airflow component registered itself anew in the metadata DB (a new job row)."""

        def watch() -> Check:
            before = self.last_job(job_type)
            return lambda: poll(lambda: self.last_job(job_type) > before and f"a new {job_type} registered", 60)

        return watch

    def last_job(self, job_type: str) -> int:
        try:
            with sqlite3.connect(f"file:{self.stack.airflow_home / 'airflow.db'}?mode=ro", uri=True, timeout=2) as db:
                return db.execute("SELECT coalesce(max(id), 0) FROM job WHERE job_type = ?", (job_type,)).fetchone()[0]
        except sqlite3.OperationalError:  # locked by a writer this instant: looked at again
            return -1

    def read_model_written(self) -> Check:
        """After the restart the publisher writes the read model again (SQLite's data_version moves)."""
        db = sqlite3.connect(f"file:{self.stack.read_model_path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        before = db.execute("PRAGMA data_version").fetchone()[0]

        def check() -> str | None:
            def moved() -> str | None:
                return "the new publisher wrote the read model" if db.execute("PRAGMA data_version").fetchone()[0] != before else None

            try:
                return poll(moved, 30)
            finally:
                db.close()

        return check

    def primary_answers(self) -> Check:
        return lambda: poll(lambda: self.answers(self.stack.primary) and "the primary answers again", 60)

    def replica_streams(self) -> Check:
        """The restarted replica streams again through the link."""
        return lambda: poll(lambda: self.streaming_port() == self.wan.port and "the replica streams through the link again", 60)

    def answers(self, server) -> bool:
        try:
            with server.connect():
                return True
        except psycopg.OperationalError:
            return False

    def streaming_port(self) -> int | None:
        try:
            with self.stack.replica.connect() as conn:
                row = conn.execute("SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'").fetchone()
        except psycopg.OperationalError:
            return None
        return row[0] if row else None

    # programs

    def pid(self, program: str) -> int:
        out = self.stack.supervisorctl("pid", program, check=False).stdout.strip()
        return int(out) if out.isdigit() else 0

    def state(self, program: str) -> str:
        words = self.stack.supervisorctl("status", program, check=False).stdout.split()
        return words[1] if len(words) > 1 else "UNKNOWN"

    def kill_program(
        self,
        program: str,
        work: Callable[[], str | None],
        watch: Callable[[], Check],
        wait_s: float = WORK_WAIT_S,
    ) -> Outcome:
        """SIGKILL ``program``'s tree once it has ``work`` in flight (or after ``wait_s`` for it); effective when
        it had, and ``watch``'s check sees it working again in its new process."""
        in_flight = self.await_work(work, wait_s)
        check = watch()
        pid = self.pid(program)
        if not pid:
            raise FaultError(f"{program} is not running")
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        for proc in tree:
            kill(proc)
        new_pid = self.wait_running(program, pid)
        detail = f"SIGKILL to {len(tree)} processes of {program} (pid {pid}); supervisord restarted it as pid {new_pid}"
        return Outcome(detail, effect(in_flight, check()))

    def stop_and_start(self, program: str, work: Callable[[], str | None], watch: Callable[[], Check]) -> Outcome:
        in_flight = self.await_work(work)
        down_s = self.rng.uniform(3, 10)
        pid = self.pid(program)
        self.stack.supervisorctl("stop", program, check=False)
        stopped = self.state(program) == "STOPPED"
        time.sleep(down_s)
        self.stack.supervisorctl("start", program, check=False)
        new_pid = self.wait_running(program, pid)
        seen = watch()()
        return Outcome(
            f"{program} (pid {pid}) stopped for {down_s:.1f} s, started again as pid {new_pid}",
            effect(in_flight, stopped and seen),
        )

    def wait_running(self, program: str, old_pid: int, timeout_s: float = 120) -> int:
        """Until supervisord reports ``program`` RUNNING in a new process; start it if supervisord gave up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state(program)
            if state == "RUNNING" and (pid := self.pid(program)) not in (0, old_pid):
                return pid
            if state in ("FATAL", "EXITED", "STOPPED"):
                self.stack.supervisorctl("start", program, check=False)
            time.sleep(0.5)
        raise FaultError(f"{program} not running {timeout_s:.0f} s after the fault (state {self.state(program)})")

    def heal(self) -> None:
        """Whatever is still broken (a fault cut short), mended: every program running, the link up, replay on."""
        self.wan.restore()
        self.wan.set_delay(BASE_RTT_S / 2)
        for program in PROGRAMS:
            if self.state(program) != "RUNNING":
                self.wait_running(program, 0)
        self.stack.primary.wait_ready()
        self.stack.replica.wait_ready()
        with self.stack.replica.connect(autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    # Airflow's tasks

    def task_instances(self, task_id: str, state: str) -> list[str]:
        """Ids of the drain DAG's ``task_id`` instances in ``state``, from the metadata DB."""
        db = self.stack.airflow_home / "airflow.db"
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
                rows = conn.execute(
                    "SELECT id FROM task_instance WHERE dag_id = ? AND task_id = ? AND state = ?",
                    (DRAIN_DAG, task_id, state),
                ).fetchall()
        except sqlite3.OperationalError:  # locked by a writer this instant: look again on the next poll
            return []
        return [normal(str(row[0])) for row in rows]

    def deferred_waits(self) -> str | None:
        deferred = self.task_instances("wait_for_replica", "deferred")
        return f"{len(deferred)} deferred wait_for_replica" if deferred else None

    def running_drain_tasks(self) -> list[psutil.Process]:
        """Processes of the drain task now running: its task instance id from the metadata DB, its pid by process title."""
        running = set(self.task_instances(DRAIN_TASK, "running"))
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith(TASK_TITLE) and normal(title[len(TASK_TITLE) :]) in running:
                found.append(proc)
        return found

    def wait_for_drain(self, timeout_s: float = 45) -> list[psutil.Process]:
        return poll(self.running_drain_tasks, timeout_s, every_s=0.1) or []

    def kill_drain_task(self) -> Outcome | None:
        """SIGKILL a drain task at a seeded moment of its life: starting, claiming, applying or acknowledging;
        effective when it died with records still unacknowledged in the buffer."""
        procs = self.wait_for_drain()
        if not procs:
            return None
        after_s = self.rng.uniform(0, 2)
        time.sleep(after_s)
        in_flight = self.buffered()
        alive = [proc for proc in procs if proc.is_running()]
        for proc in alive:
            kill(proc)
        if not alive:
            return None
        pids = ", ".join(str(p.pid) for p in alive)
        return Outcome(f"SIGKILL to the drain task {after_s:.1f} s after it was seen running (pid {pids})", effect(in_flight, "killed"))

    def kill_triggerer(self) -> Outcome:
        """SIGKILL the triggerer while it holds a deferred ``wait_for_replica`` (replay is paused until one defers)."""
        self.stack.replica.wait_ready()
        with self.stack.replica.connect(autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            try:
                return self.kill_program("airflow-triggerer", self.deferred_waits, self.new_job("TriggererJob"), wait_s=45)
            finally:
                conn.execute("SELECT pg_wal_replay_resume()")

    # the replica and the link

    def replica_lag(self) -> Outcome:
        """Pause replay for a seeded time, longer (at most ``WORK_WAIT_S``) until WAL arrived that it held back;
        effective when the replica was seen with received WAL it had not replayed."""
        paused_s = self.rng.uniform(5, 20)
        self.stack.replica.wait_ready()  # RUNNING to supervisord may still be starting up to PostgreSQL
        behind = 0
        with self.stack.replica.connect(autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            started = time.monotonic()
            while (waited := time.monotonic() - started) < paused_s or (not behind and waited < paused_s + WORK_WAIT_S):
                behind = max(
                    behind,
                    conn.execute(
                        "SELECT coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)",
                    ).fetchone()[0],
                )
                time.sleep(0.5)
            conn.execute("SELECT pg_wal_replay_resume()")
        seen = f"{behind} bytes of WAL waited to be replayed" if behind > 0 else None
        return Outcome(f"replica replay paused for {time.monotonic() - started:.1f} s", seen)

    def wan_latency(self) -> Outcome:
        """A new round trip; effective when a query over the link took at least that long."""
        rtt_s = self.rng.uniform(*RTT_RANGE_S)
        self.wan.set_delay(rtt_s / 2)
        with psycopg.connect(self.stack.primary.conninfo(), port=self.wan.port, connect_timeout=30) as conn:
            started = time.monotonic()
            conn.execute("SELECT 1")
            took_s = time.monotonic() - started
        seen = f"a query over the link took {took_s * 1000:.0f} ms" if took_s >= 0.9 * rtt_s else None
        return Outcome(f"link round trip now {rtt_s * 1000:.0f} ms", seen)

    def wan_blackhole(self) -> Outcome:
        """Cut the link; effective when the cut held bytes of an open connection or a new connection."""
        cut_s = self.rng.uniform(5, 20)
        held = self.wan.held
        self.wan.blackhole()
        time.sleep(cut_s)
        self.wan.restore()
        held = self.wan.held - held
        return Outcome(f"link blackholed for {cut_s:.1f} s", held and f"{held} chunks or connections held by the cut" or None)

    def wan_reset(self) -> Outcome:
        """Reset every connection over the link, while a drain task applies a batch when one runs within the wait."""
        during = bool(self.wait_for_drain())
        time.sleep(self.rng.uniform(0, 0.5))
        count = self.wan.reset_connections()
        detail = "reset every connection over the link" + (" while the drain task ran" if during else "")
        return Outcome(detail, count and f"{count} open connections reset" or None)


def effect(in_flight: str | None, seen: str | bool | None) -> str | None:
    """A fault's effect: what it hit in flight and what showed it worked again; None when either is missing."""
    if not in_flight or not seen:
        return None
    return f"{in_flight} when it hit" + (f"; {seen}" if isinstance(seen, str) else "")


def poll(found: Callable, timeout_s: float, every_s: float = 0.5):
    """``found()``'s first true answer within ``timeout_s`` (its last, false, answer after that)."""
    deadline = time.monotonic() + timeout_s
    while not (answer := found()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return answer


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stream_id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


def kill(proc: psutil.Process) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass


def normal(ti_id: str) -> str:
    """A task instance id as the DB and the process title may spell it: hex digits only, lower case."""
    return ti_id.strip().replace("-", "").lower()
