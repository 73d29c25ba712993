"""A PostgreSQL 15 primary ("Cologne") and its streaming replica ("observatory") on this machine.

The same class serves ``make up`` (where supervisord runs :meth:`PostgresServer.command` in the
foreground) and the tests (which start, stop and kill servers mid-test with ``pg_ctl``).
"""

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from devstack.process import make_owned_dir, run_as, write_private
from opsync.health import postgres_role

DATABASE = "opsync"
SUPERUSER = "opsync"
REPLICATION_USER = "replicator"
REPLICATION_SLOT = "observatory"


@dataclass(frozen=True)
class Credentials:
    password: str
    replication_password: str


@dataclass
class PostgresServer:
    name: str
    root: Path  # holds data/, the socket and the log; owned by os_user
    port: int
    bin_dir: Path
    os_user: str | None
    credentials: Credentials
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def exists(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def url(self, database: str = DATABASE, driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL (with the password: treat as a secret)."""
        return f"{driver}://{SUPERUSER}:{self.credentials.password}@{self.host}:{self.port}/{database}"

    def conninfo(self, database: str = DATABASE) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host, port=self.port, dbname=database, user=SUPERUSER, password=self.credentials.password
        )

    def connect(self, database: str = DATABASE, **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(database), connect_timeout=5, **kwargs)

    def command(self) -> list[str]:
        """Foreground server command, for a supervisor."""
        return [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]

    def _pg(self, *args: str, **kwargs):
        return run_as(self.os_user, [str(self.bin_dir / args[0]), *args[1:]], **kwargs)

    def _settings(self) -> str:
        return "\n".join(
            [
                f"listen_addresses = '{self.host}'",
                f"port = {self.port}",
                f"unix_socket_directories = '{self.root}'",
                "wal_level = replica",
                "max_wal_senders = 10",
                "max_replication_slots = 10",
                "max_slot_wal_keep_size = '10GB'",
                "hot_standby = on",
                "hot_standby_feedback = on",
                "wal_receiver_status_interval = '1s'",
                "wal_retrieve_retry_interval = '1s'",
                "logging_collector = off",
                "log_line_prefix = '%m [%p] %q%u@%d '",
                "",
            ]
        )

    def init_primary(self) -> None:
        """initdb with password auth over TCP; the local socket lives in a 0700 directory."""
        make_owned_dir(self.root, self.os_user)
        pwfile = self.root / "initdb.pw"
        write_private(pwfile, self.credentials.password + "\n", self.os_user)
        try:
            self._pg(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            )
        finally:
            pwfile.unlink()
        self._write_conf("opsync.conf", self._settings())
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("include_if_exists = 'opsync.conf'\n")
        self.start()
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {}").format(
                    sql.Identifier(REPLICATION_USER), sql.Literal(self.credentials.replication_password)
                )
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
            conn.execute("SELECT pg_create_physical_replication_slot(%s)", (REPLICATION_SLOT,))

    def init_replica(self, primary: "PostgresServer") -> None:
        """Streaming replica of a running primary, through the slot, as ``pg_basebackup -R`` sets it up."""
        make_owned_dir(self.root, self.os_user)
        self._pg(
            "pg_basebackup",
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            REPLICATION_USER,
            "-D",
            str(self.data_dir),
            "-R",
            "-c",
            "fast",
            "-X",
            "stream",
            "-S",
            REPLICATION_SLOT,
            env={**os.environ, "PGPASSWORD": self.credentials.replication_password},
        )
        self._write_conf("opsync.conf", self._settings())

    def _write_conf(self, name: str, text: str) -> None:
        write_private(self.data_dir / name, text, self.os_user)

    def start(self, timeout: int = 60) -> None:
        self._pg("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", str(timeout), "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster), as a power cut would; children follow."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        while self.pid() is not None:
            time.sleep(0.05)

    def create_database(self, name: str) -> str:
        """A new empty database on this server; returns its SQLAlchemy URL."""
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def in_recovery(self) -> bool:
        with self.connect() as conn:
            return conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]

    def wait_streaming(self, timeout: float = 60) -> None:
        """Wait until this standby's WAL receiver streams again (after a primary restart)."""
        deadline = time.monotonic() + timeout
        while (health := postgres_role(self.conninfo(), expect_recovery=True)) and not health.ok:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {health.detail}")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def provision(primary: PostgresServer, replica: PostgresServer) -> None:
    """Create the primary and its streaming replica once; both are left running."""
    primary.init_primary()
    replica.init_replica(primary)
    replica.start()
