"""WAL positions (LSNs): parsed to numbers, and where a replica has replayed to.

PostgreSQL prints an LSN as two hex halves, ``X/Y``; compared as strings ``9/0`` would sort after
``10/0``, so every comparison here is numeric. A replica that is not in recovery (promoted, or a
primary by mistake) or that reports no replay position is an error, never "caught up": treating
it as caught up would mark transactions replicated that the site cannot read.
"""

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

REPLAY_SQL = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"
CURRENT_SQL = "SELECT pg_current_wal_lsn()::text"


class Lsn(int):
    """A WAL position as the 64-bit number it is; ``str()`` gives PostgreSQL's ``X/Y`` form."""

    @classmethod
    def parse(cls, value: str) -> "Lsn":
        high, sep, low = value.strip().partition("/")
        if not sep or not high or not low:
            raise ValueError(f"not an LSN: {value!r}")
        return cls((int(high, 16) << 32) | int(low, 16))

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


class ReplicaError(Exception):
    """The replica's replay position is unknown: nothing can be confirmed against it now."""


class ReplicaUnreachable(ReplicaError):
    """The replica did not answer (stopped, restarting, network)."""


class NotReplaying(ReplicaError):
    """The server answered but is not a replaying standby (promoted, a primary, or no WAL replayed yet)."""


def replay_position(in_recovery: bool, replay_lsn: str | None) -> Lsn:
    """Interpret one row of :data:`REPLAY_SQL`; shared with async pollers that run the query themselves."""
    if not in_recovery:
        raise NotReplaying("the replica is not in recovery (promoted or a primary): its position says nothing")
    if replay_lsn is None:
        raise NotReplaying("the replica reports no replay position (pg_last_wal_replay_lsn() is NULL)")
    return Lsn.parse(replay_lsn)


def replica_position(replica: Engine) -> Lsn:
    """How far the replica has replayed."""
    try:
        with replica.connect() as conn:
            row = conn.execute(text(REPLAY_SQL)).one()
    except DBAPIError as exc:
        raise ReplicaUnreachable(f"replica unreachable: {exc.orig}".strip()) from exc
    return replay_position(*row)


def current_position(primary: Engine) -> Lsn:
    """The primary's current WAL position: on the main site, what is committed is already readable there."""
    with primary.connect() as conn:
        return Lsn.parse(conn.execute(text(CURRENT_SQL)).scalar_one())
