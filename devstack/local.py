"""The whole site on one machine under supervisord: what ``make up`` / ``make down`` run.

Order matters and is enforced here, not by supervisor priorities alone: databases and Redis first,
then migrations, then everything that talks to them. Shutdown runs in reverse priority order, so
the API stops accepting before Redis closes its (already fsynced) AOF.
"""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import psycopg
import redis
from psycopg import sql
from sqlalchemy import create_engine

from devstack import airflow
from devstack.postgres import Credentials, PostgresServer, provision
from devstack.redis import RedisServer
from devstack.settings import REPO, StackSettings
from opsync import domain, health, migrate
from opsync.auth import create_token
from opsync.read_model import metadata as served_metadata
from opsync.read_model.store import ensure_read_model
from opsync.registry import ingestible_tables

VENV_BIN = Path(sys.executable).parent


@dataclass
class Program:
    name: str
    command: list[str]
    priority: int
    user: str | None = None
    stopsignal: str = "TERM"
    stopwaitsecs: int = 30
    group_kill: bool = False


@dataclass
class Check:
    name: str
    probe: Callable[[], health.Health]


def api_command(host: str, port: int, workers: int, metrics_dir: Path) -> list[str]:
    """How the ingest API runs, for ``make up`` and ``make bench-ingest`` alike (see ``ingest_api.__main__``)."""
    return [
        str(VENV_BIN / "python"),
        "-m",
        "ingest_api",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--metrics-dir",
        str(metrics_dir),
    ]


DATASETTE_SETTINGS = (  # for `make up`, bench-read and the tests; docker-compose.yaml repeats them
    "--setting",
    "facet_time_limit_ms",
    "1000",  # 1M-row facets take up to ~0.25 s: don't let them vanish
    "--setting",
    "suggest_facets",
    "off",  # suggestions tried every column: 1.1 s of a 1M-row page (make bench-read)
    "--setting",
    "sql_time_limit_ms",
    "1000",  # every query, arbitrary SQL too (Datasette's default, made explicit)
    # Threads: SQL of the client's choosing gets 2 at most (datasette/plugins/opsync_sql_limits.py), the rest pages.
    "--setting",
    "num_sql_threads",
    "6",
)


def datasette_command(read_model: Path, host: str, port: int, public: bool = True, metadata: Path | None = None) -> list[str]:
    """How Datasette runs, for ``make up`` and ``make bench-read`` alike.

    ``public``: anyone who reaches it reads (``OPSYNC_DATASETTE_PUBLIC``, see
    ``datasette/plugins/opsync_access.py``); set in the command so that every caller gets it.
    ``metadata``: the domain's Datasette metadata, the configured domain's by default (another for a
    test of another domain); merged with the engine's into ``metadata.json`` beside the read model.
    """
    return [
        "/usr/bin/env",
        f"OPSYNC_DATASETTE_PUBLIC={'true' if public else 'false'}",
        str(VENV_BIN / "datasette"),
        "serve",
        str(read_model),
        "--host",
        host,
        "--port",
        str(port),
        "--metadata",
        str(served_metadata.write(read_model.with_name("metadata.json"), metadata or domain.current().datasette_metadata)),
        "--plugins-dir",
        str(REPO / "datasette/plugins"),  # runs the read-model publisher, adds row links
        *DATASETTE_SETTINGS,
    ]


@dataclass
class LocalStack:
    settings: StackSettings = field(default_factory=StackSettings)

    def __post_init__(self) -> None:
        s = self.settings
        credentials = Credentials(s.secrets["pg_password"], s.secrets["replication_password"])
        user = s.pg_os_user if os.geteuid() == 0 else None
        self.primary = PostgresServer("primary", s.run_dir / "pg/primary", s.primary_port, s.pg_bin, user, credentials, s.host)
        self.replica = PostgresServer("replica", s.run_dir / "pg/replica", s.replica_port, s.pg_bin, user, credentials, s.host)
        # what the site calls the primary: the server itself, or the link in front of it (soak test)
        self.primary_link = replace(self.primary, port=s.primary_link_port) if s.primary_link_port else self.primary
        self.redis = RedisServer(s.run_dir / "redis", s.redis_port, s.secrets["redis_password"], s.redis_bin, s.host, s.redis_maxmemory)
        self.airflow_home = s.run_dir / "airflow"

    @property
    def conf_path(self) -> Path:
        return self.settings.run_dir / "supervisord.conf"

    @property
    def read_model_path(self) -> Path:
        return self.settings.run_dir / "datasette" / "opsync.db"

    def env(self) -> dict[str, str]:
        """Environment of every program: opsync settings, Airflow settings and connections."""
        s = self.settings
        env = {
            **os.environ,
            **airflow.airflow_env(self.airflow_home, s.airflow_port, s.secrets["airflow"], REPO, s.host),
            "OPSYNC_PRIMARY_URL": self.primary_link.url(),
            "OPSYNC_REPLICA_URL": self.replica.url(),
            "OPSYNC_REDIS_URL": self.redis.url,
            "OPSYNC_READ_MODEL_PATH": str(self.read_model_path),
            "AIRFLOW_CONN_OPSYNC_PRIMARY": self.primary_link.url(driver="postgresql"),
            "AIRFLOW_CONN_OPSYNC_REPLICA": self.replica.url(driver="postgresql"),
            "AIRFLOW_CONN_OPSYNC_BUFFER": self.redis.url,
            # Datasette: cookies stay valid across restarts; the script token (role `script`). GitHub
            # sign-in (OPSYNC_GITHUB_CLIENT_ID, _CLIENT_SECRET, _ORG or _TEAM) comes from the caller's environment.
            "DATASETTE_SECRET": s.ensure_secret("datasette_secret"),
            "OPSYNC_DATASETTE_TOKEN": s.ensure_secret("datasette_token"),
        }
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def programs(self) -> list[Program]:
        s = self.settings
        pg_user = self.primary.os_user
        programs = [
            Program("primary", self.primary.command(), 10, pg_user, "INT", 60),
            Program("replica", self.replica.command(), 11, pg_user, "INT", 60),
            Program("redis", self.redis.command(), 12),
            Program(
                "ingest-api",
                api_command(s.host, s.api_port, s.api_workers, s.run_dir / "api-metrics"),
                20,
            ),
            Program(
                "datasette",
                datasette_command(self.read_model_path, s.host, s.datasette_port, s.datasette_public),
                21,
            ),
        ]
        programs += [
            Program(f"airflow-{name}", command, 30, group_kill=True) for name, command in airflow.airflow_programs(s.airflow_port).items()
        ]
        return programs

    def checks(self) -> list[Check]:
        s = self.settings
        return [
            Check("primary", lambda: health.postgres_role(self.primary.conninfo(), expect_recovery=False)),
            Check("replica", lambda: health.postgres_role(self.replica.conninfo(), expect_recovery=True)),
            Check("redis", lambda: health.redis_durability(redis.Redis.from_url(self.redis.url, socket_timeout=3))),
            Check("ingest-api", lambda: http_health(f"http://{s.host}:{s.api_port}/readyz")),
            Check("datasette", lambda: http_health(f"http://{s.host}:{s.datasette_port}/-/versions.json")),
            Check("airflow", lambda: airflow.airflow_health(s.airflow_port, s.host)),
        ]

    def write_supervisor_conf(self) -> None:
        s = self.settings
        s.logs.mkdir(parents=True, exist_ok=True)
        sock = s.run_dir / "supervisor.sock"
        sections = [
            f"[unix_http_server]\nfile={sock}\nchmod=0700\n",
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
            f"[supervisorctl]\nserverurl=unix://{sock}\n",
            f"[supervisord]\nlogfile={s.logs / 'supervisord.log'}\npidfile={s.run_dir / 'supervisord.pid'}\n"
            f"childlogdir={s.logs}\n" + ("user=root\n" if os.geteuid() == 0 else ""),
        ]
        for p in self.programs():
            lines = [
                f"[program:{p.name}]",
                "command=" + " ".join(_quote(arg) for arg in p.command),
                # a program run as another user (PostgreSQL under root) may not enter the checkout (a 0700 clone)
                f"directory={s.run_dir if p.user else REPO}",
                f"priority={p.priority}",
                "autostart=false",
                "autorestart=true",
                "startsecs=3",
                f"stopsignal={p.stopsignal}",
                f"stopwaitsecs={p.stopwaitsecs}",
                f"stdout_logfile={s.logs / (p.name + '.log')}",
                "stdout_logfile_maxbytes=50MB",
                "stdout_logfile_backups=3",
                "redirect_stderr=true",
            ]
            if p.user:
                lines.append(f"user={p.user}")
            if p.group_kill:
                lines += ["stopasgroup=true", "killasgroup=true"]
            sections.append("\n".join(lines) + "\n")
        self.conf_path.write_text("\n".join(sections))

    def supervisorctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "supervisorctl"), "-c", str(self.conf_path), *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def supervisord_pid(self) -> int | None:
        try:
            pid = int((self.settings.run_dir / "supervisord.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None

    def provision(self, say: Callable[[str], None]) -> None:
        """First run only: create both clusters, Redis config, the read-model file."""
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        self.settings.run_dir.chmod(0o755)
        (self.settings.run_dir / "pg").mkdir(exist_ok=True)
        if not self.primary.exists:
            say("creating the primary (Cologne) and its streaming replica (observatory)")
            provision(self.primary, self.replica)
            self.replica.stop()
            self.primary.stop()
        self.redis.write_config()
        ensure_read_model(self.read_model_path)

    def up(self, say: Callable[[str], None] = print) -> None:
        self.provision(say)
        self.write_supervisor_conf()
        env = self.env()
        if self.supervisord_pid() is None:
            subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(self.conf_path)], env=env, check=True)
        else:
            self.supervisorctl("update", check=False)
        say("starting PostgreSQL primary, replica and Redis")
        storage = ["primary", "replica", "redis"]
        self.supervisorctl("start", *storage, check=False)
        self.wait_healthy([c for c in self.checks() if c.name in storage], say, storage)
        if self.primary_link is not self.primary:
            self.replicate_through_link()
        say("applying migrations to the primary")
        migrate.upgrade(self.primary.url())
        self.ensure_demo_token()
        airflow.migrate_metadata_db(env)
        airflow.write_admin_password(self.airflow_home, self.settings.secrets["airflow_admin_password"])
        say("starting the ingest API, Datasette and Airflow")
        self.supervisorctl("start", "all", check=False)
        self.wait_healthy(self.checks(), say, [p.name for p in self.programs()])

    def replicate_through_link(self) -> None:
        """Point the replica's WAL receiver at the link in front of the primary: on reload it reconnects there."""
        with self.replica.connect(autocommit=True) as conn:
            current = conn.execute("SHOW primary_conninfo").fetchone()[0]
            conninfo = psycopg.conninfo.make_conninfo(current, host=self.primary_link.host, port=self.primary_link.port)
            conn.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(conninfo)))
            conn.execute("SELECT pg_reload_conf()")

    def ensure_demo_token(self) -> None:
        """Issue the demo token once (all tables, read and write) and keep it with the other secrets."""
        if "demo_token" in self.settings.secrets:
            return
        scopes = [f"{verb}:{entry.name}" for entry in ingestible_tables() for verb in ("read", "write")]
        engine = create_engine(self.primary.url())
        try:
            self.settings.save_secret("demo_token", create_token(engine, f"demo-{int(time.time())}", scopes))
        finally:
            engine.dispose()

    def down(self, say: Callable[[str], None] = print) -> None:
        pid = self.supervisord_pid()
        if pid is None:
            say("not running")
            return
        say("stopping every program (Airflow, API, Datasette, then Redis and PostgreSQL)")
        self.supervisorctl("shutdown", check=False)
        deadline = time.monotonic() + 180
        while self.supervisord_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.supervisord_pid() is not None:
            raise RuntimeError(f"supervisord (pid {pid}) did not stop; see {self.settings.logs}")

    def wait_healthy(self, checks: list[Check], say: Callable[[str], None], programs: list[str]) -> None:
        deadline = time.monotonic() + self.settings.health_timeout
        pending = list(checks)
        while pending:
            results = {c.name: c.probe() for c in pending}
            for name, result in results.items():
                if result.ok:
                    say(f"  {name:<11} ok  {result.detail}")
            pending = [c for c in pending if not results[c.name].ok]
            self.raise_if_fatal(programs)
            if pending and time.monotonic() > deadline:
                detail = "; ".join(f"{c.name}: {results[c.name].detail}" for c in pending)
                raise RuntimeError(f"not healthy after {self.settings.health_timeout:.0f}s: {detail} (logs in {self.settings.logs})")
            if pending:
                time.sleep(1)

    def raise_if_fatal(self, programs: list[str]) -> None:
        """A program supervisord gave up on will not become healthy: say so now, with its log."""
        states = dict(line.split()[:2] for line in self.supervisorctl("status", check=False).stdout.splitlines() if line.strip())
        fatal = [name for name in programs if states.get(name) == "FATAL"]
        if fatal:
            tails = "\n".join(f"--- {name}:\n{log_tail(self.settings.logs / (name + '.log'))}" for name in fatal)
            raise RuntimeError(f"{', '.join(fatal)} failed to start:\n{tails}")

    def status(self) -> list[tuple[str, health.Health]]:
        return [(c.name, c.probe()) for c in self.checks()]


def http_health(url: str) -> health.Health:
    try:
        response = httpx.get(url, timeout=3)
    except httpx.HTTPError as exc:
        return health.Health(False, f"unreachable: {exc}")
    return health.Health(response.status_code == 200, f"HTTP {response.status_code}")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg
