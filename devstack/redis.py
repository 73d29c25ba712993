"""The site buffer's Redis, configured for durability: every acknowledged write is fsynced.

``appendfsync always`` makes the ingest API's answer mean "on disk"; ``noeviction`` makes a full
buffer refuse writes instead of silently dropping records.
"""

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devstack.process import write_private
from opsync.health import DURABLE_REDIS

# Small hashes stay listpacks (a few bytes per field, not a hash table's ~50): the buffer's bucketed
# replicated statuses (up to 512 per 256 ms of acceptance, ~110 bytes each) and overlay rows. Redis'
# defaults (128 fields, 64 bytes) make those buckets hash tables; README "Backpressure" has the figures.
# Small sorted sets likewise: the overlay's index buckets (~4 s of row keys each, ~80 at the peak; up to
# 1,024, 250 rows/s, ~40 bytes a key instead of a skiplist's ~130: a burst past 512 in one bucket made its
# conversion cost more than the room backpressure had left, tests/test_buffer_sizing.py).
# A restart loads the AOF's RDB base fast and replays its incremental part command by command (~2.5x
# slower per byte here): rewriting once the incremental part is a quarter of the base, not as big as it
# (Redis' default 100%), bounds the replay, at about 5x instead of 2x the final size written over a fill.
BUFFER_REDIS_TUNING = {
    "hash-max-listpack-entries": "512",
    "hash-max-listpack-value": "256",
    "zset-max-listpack-entries": "1024",
    "auto-aof-rewrite-percentage": "25",
}


@dataclass
class RedisServer:
    root: Path
    port: int
    password: str
    binary: str = "redis-server"
    host: str = "127.0.0.1"
    maxmemory: str = "10gb"  # room for 48 h of buffering at peak; see README "Backpressure"
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.root / "redis.conf"

    @property
    def pid(self) -> int | None:
        """The server's process while this object runs it."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def write_config(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            "protected-mode yes",
            f"requirepass {self.password}",
            f"dir {self.root / 'data'}",
            "daemonize no",
            *(f"{key} {value}" for key, value in DURABLE_REDIS.items()),
            f"maxmemory {self.maxmemory}",
            "save ''",
            "aof-use-rdb-preamble yes",
            *(f"{key} {value}" for key, value in BUFFER_REDIS_TUNING.items()),
            "",
        ]
        write_private(self.conf_path, "\n".join(lines))

    def command(self) -> list[str]:
        """Foreground server command, for a supervisor."""
        return [self.binary, str(self.conf_path)]

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, **kwargs)

    def start(self, timeout: float = 30) -> None:
        if not self.conf_path.exists():
            self.write_config()
        log = open(self.root / "server.log", "ab")
        self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until the server answers PING with its AOF loaded (LOADING errors until then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as client:
                    client.ping()
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}; see {self.root}/server.log") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Clean shutdown (the AOF is already fsynced; SHUTDOWN just closes it properly)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Crash the server: only what was fsynced survives."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.kill(self._proc.pid, sig)
        self._proc.wait(30)
        self._proc = None
