"""Health of the services a site depends on, shared by ``/readyz``, ``make up`` and the CLI.

Each check returns a :class:`Health`; none raises, so callers can report every problem at once.
"""

from dataclasses import dataclass
from typing import cast

import psycopg
import redis

from opsync.connections import Timeouts, connect

DURABLE_REDIS = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
CHECK_TIMEOUTS = Timeouts(3, 3)  # a check answers at once or reports the service as unreachable


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


def redis_durability(client: redis.Redis) -> Health:
    """Reachable, and configured so that an acknowledged write survives a crash."""
    try:
        config = {key: client.config_get(key).get(key) for key in DURABLE_REDIS}
    except redis.RedisError as exc:
        return Health(False, f"unreachable: {exc}")
    wrong = {k: v for k, v in config.items() if _text(v) != DURABLE_REDIS[k]}
    if wrong:
        return Health(False, "not durable: " + ", ".join(f"{k}={_text(v)}" for k, v in wrong.items()))
    return Health(True, "appendonly=yes appendfsync=always noeviction")


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def postgres_role(conninfo: str, expect_recovery: bool) -> Health:
    """The primary must accept writes; the replica must be a standby that is streaming."""
    try:
        with connect(conninfo, CHECK_TIMEOUTS) as conn:
            in_recovery, replay_lsn = cast(
                tuple,
                conn.execute(  # no FROM: always one row
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()"
                ).fetchone(),
            )
            streaming = conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone()
    except psycopg.Error as exc:
        return Health(False, f"unreachable: {str(exc).strip()}")
    if in_recovery != expect_recovery:
        return Health(False, "in recovery" if in_recovery else "not in recovery (not a standby)")
    if not expect_recovery:
        return Health(True, "primary, accepting writes")
    if replay_lsn is None or streaming is None:
        return Health(False, f"standby not streaming (replay LSN {replay_lsn}, receiver {streaming})")
    return Health(True, f"standby {streaming[0]}, replayed {replay_lsn}")
