"""The faults the soak test injects into a running local site; each breaks one thing, waits, and heals it.

Every fault returns once the site is whole again (a killed program running again, the link back),
so faults never pile up and a seed replays the same sequence; only a new round trip (250–500 ms)
stays until the next one, as the link's weather does. Processes are killed with SIGKILL by
pid: a program's whole process tree under supervisord (as a crash of that service would), or the
one process of a running drain task, found through Airflow's metadata DB and its process title.
Restarting killed programs is supervisord's job (``autorestart``); the faults only wait for it.
"""

import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from opsync.stack.local import LocalStack
from opsync.stack.wan import WanProxy

BASE_RTT_S = 0.25
RTT_RANGE_S = (0.25, 0.5)
DRAIN_DAG, DRAIN_TASK = "opsync_drain", "drain"
TASK_TITLE = "airflow worker -- "  # Airflow's process title of a running task (task_runner.startup)
PROGRAMS = (
    "primary", "replica", "redis", "ingest-api", "datasette",
    "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
)


class FaultError(RuntimeError):
    """The site did not come back from a fault in time: the soak cannot go on."""


@dataclass
class Faults:
    stack: LocalStack
    wan: WanProxy
    rng: random.Random
    say: Callable[[str], None]
    injected: Counter = field(default_factory=Counter)

    def kinds(self) -> dict[str, Callable[[], str | None]]:
        """Each kind of fault by name; a fault returns what it did, or None when it found nothing to break."""
        return {
            "kill_redis": lambda: self.kill_program("redis"),
            "kill_ingest_api": lambda: self.kill_program("ingest-api"),
            "kill_scheduler": lambda: self.kill_program("airflow-scheduler"),
            "kill_triggerer": lambda: self.kill_program("airflow-triggerer"),
            "kill_publisher": lambda: self.kill_program("datasette"),
            "kill_drain_task": self.kill_drain_task,
            "restart_primary": lambda: self.stop_and_start("primary"),
            "restart_replica": lambda: self.stop_and_start("replica"),
            "replica_lag": self.replica_lag,
            "wan_latency": self.wan_latency,
            "wan_blackhole": self.wan_blackhole,
            "wan_reset": self.wan_reset,
        }

    def inject(self, kind: str) -> bool:
        """Inject one fault and heal it; False when there was nothing to break (no drain task ran)."""
        started = time.monotonic()
        detail = self.kinds()[kind]()
        if detail is None:
            self.say(f"fault {kind}: skipped, nothing to break now")
            return False
        self.injected[kind] += 1
        self.say(f"fault {kind}: {detail} ({time.monotonic() - started:.1f} s)")
        return True

    def schedule(self, until: float, gap_s: tuple[float, float]) -> None:
        """Inject every kind in a seeded shuffled order, round after round, until the monotonic time ``until``."""
        deck: list[str] = []
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

    # programs

    def pid(self, program: str) -> int:
        out = self.stack.supervisorctl("pid", program, check=False).stdout.strip()
        return int(out) if out.isdigit() else 0

    def state(self, program: str) -> str:
        words = self.stack.supervisorctl("status", program, check=False).stdout.split()
        return words[1] if len(words) > 1 else "UNKNOWN"

    def kill_program(self, program: str) -> str:
        pid = self.pid(program)
        if not pid:
            raise FaultError(f"{program} is not running")
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        for proc in tree:
            kill(proc)
        new_pid = self.wait_running(program, pid)
        return f"SIGKILL to {len(tree)} processes of {program} (pid {pid}); supervisord restarted it as pid {new_pid}"

    def stop_and_start(self, program: str) -> str:
        down_s = self.rng.uniform(3, 10)
        self.stack.supervisorctl("stop", program, check=False)
        time.sleep(down_s)
        self.stack.supervisorctl("start", program, check=False)
        self.wait_running(program, 0)
        return f"{program} stopped for {down_s:.1f} s, started again"

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

    # the drain task

    def running_drain_tasks(self) -> list[psutil.Process]:
        """Processes of the drain task now running: its task instance id from the metadata DB, its pid by process title."""
        db = self.stack.airflow_home / "airflow.db"
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
                rows = conn.execute(
                    "SELECT id FROM task_instance WHERE dag_id = ? AND task_id = ? AND state = 'running'",
                    (DRAIN_DAG, DRAIN_TASK),
                ).fetchall()
        except sqlite3.OperationalError:  # locked by a writer this instant: look again on the next poll
            return []
        running = {normal(str(row[0])) for row in rows}
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith(TASK_TITLE) and normal(title[len(TASK_TITLE):]) in running:
                found.append(proc)
        return found

    def wait_for_drain(self, timeout_s: float = 45) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if procs := self.running_drain_tasks():
                return procs
            time.sleep(0.1)
        return []

    def kill_drain_task(self) -> str | None:
        """SIGKILL a drain task at a seeded moment of its life: starting, claiming, applying or acknowledging."""
        procs = self.wait_for_drain()
        if not procs:
            return None
        after_s = self.rng.uniform(0, 2)
        time.sleep(after_s)
        alive = [proc for proc in procs if proc.is_running()]
        for proc in alive:
            kill(proc)
        if not alive:
            return None
        return f"SIGKILL to the drain task {after_s:.1f} s after it was seen running (pid {', '.join(str(p.pid) for p in alive)})"

    # the replica and the link

    def replica_lag(self) -> str:
        paused_s = self.rng.uniform(5, 20)
        self.stack.replica.wait_ready()  # RUNNING to supervisord may still be starting up to PostgreSQL
        with self.stack.replica.connect(autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            time.sleep(paused_s)
            conn.execute("SELECT pg_wal_replay_resume()")
        return f"replica replay paused for {paused_s:.1f} s"

    def wan_latency(self) -> str:
        rtt_s = self.rng.uniform(*RTT_RANGE_S)
        self.wan.set_delay(rtt_s / 2)
        return f"link round trip now {rtt_s * 1000:.0f} ms"

    def wan_blackhole(self) -> str:
        cut_s = self.rng.uniform(5, 20)
        self.wan.blackhole()
        time.sleep(cut_s)
        self.wan.restore()
        return f"link blackholed for {cut_s:.1f} s"

    def wan_reset(self) -> str:
        """Reset every connection over the link, while a drain task applies a batch when one runs within the wait."""
        during = bool(self.wait_for_drain())
        time.sleep(self.rng.uniform(0, 0.5))
        count = self.wan.reset_connections()
        return f"reset {count} connections over the link" + (" while the drain task ran" if during else "")


def kill(proc: psutil.Process) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass


def normal(ti_id: str) -> str:
    """A task instance id as the DB and the process title may spell it: hex digits only, lower case."""
    return ti_id.strip().replace("-", "").lower()
