"""Reading the primary's change capture (``row_change``) incrementally, from the replica.

Triggers (migration 0002) record, for every insert, update and delete on an ingestible table, the
changed row's key stamped with the writing transaction's id, ``pg_current_xact_id()`` (an xid8:
64 bits, never wraps). A reader keeps a position ``(xid, seq)``: every change of a transaction
below ``xid`` has been read.

Why reading up to the snapshot's xmin is safe against late commits: xids are handed out in
increasing order, but transactions commit in any order, so "the largest xid read so far" is not a
watermark: a transaction A with a smaller xid can commit after B with a larger one. Instead each
read takes ``xmin = pg_snapshot_xmin(pg_current_snapshot())``: every transaction below ``xmin`` has
ended (committed or aborted) as of that snapshot, and every transaction still running, or started
later, has an xid at or above ``xmin``. So the set of changes below ``xmin`` is final: nothing can
be added to it later, and reading all of it, in ``(xid, seq)`` order past the position, misses
nothing and reads nothing twice. A transaction in progress holds ``xmin`` at or below its own xid
until it ends, so its changes are read once it has committed, whenever that is. On the replica
the snapshot is built from the replayed WAL, and a transaction counts as running there until its
commit record is replayed, so the same holds for what the replica can show.

The reader then re-reads the current rows for the changed keys (a later snapshot is fine: it is
at least as new), so the order of changes between transactions never matters, and a row changed
many times is read once.

Purging (on the primary: the replica is read-only) deletes old changes and raises
``row_change_horizon.purged_below``; a reader whose position is below it may have missed changes
and must resync the whole model instead.
"""

from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from sqlalchemy import Engine, text

from opsync import registry

SNAPSHOT_SQL = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, (SELECT purged_below FROM row_change_horizon)")
# Run on the driver's cursor (psycopg placeholders): up to 10,000 plain tuples, keys as text, which is what
# the publisher writes and sends back; no UUID or SQLAlchemy row objects built per change.
CHANGES_SQL = (
    "SELECT xid, seq, table_name, row_id::text FROM row_change"
    " WHERE xid < %(xmin)s AND (xid, seq) > (%(xid)s, %(seq)s) ORDER BY xid, seq LIMIT %(limit)s"
)
PURGE_SQL = text(
    """
    WITH purged AS (
        DELETE FROM row_change
        WHERE changed_at < now() - :keep AND xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
        RETURNING xid
    )
    UPDATE row_change_horizon SET purged_below = greatest(purged_below, (SELECT max(xid) + 1 FROM purged))
    WHERE (SELECT count(*) FROM purged) > 0
    RETURNING (SELECT count(*) FROM purged)
    """
)


@dataclass(frozen=True)
class Position:
    """Every change of a transaction below ``xid`` has been read, and of ``xid`` itself up to ``seq``."""

    xid: int
    seq: int = -1  # Position(xmin): nothing of xmin itself read yet


@dataclass(frozen=True)
class Changes:
    ids: dict[str, set[str]]  # table -> keys changed, as text
    position: Position  # where the next read starts
    missed: bool  # changes past the old position were purged: resync instead
    complete: bool  # everything final has been read (False: more to read now)

    @property
    def keys(self) -> dict[str, set[UUID | str]]:
        """The keys changed, typed as their tables' key columns (a UUID, or a natural key's text)."""
        return {table: {registry.get_table(table).key_of(i) for i in ids} for table, ids in self.ids.items()}


def snapshot_xmin(replica: Engine) -> int:
    """The xmin of a fresh snapshot on the replica: what a full load from it has reflected."""
    with replica.connect() as conn:
        return conn.execute(SNAPSHOT_SQL).one()[0]


def read_changes(replica: Engine, position: Position, limit: int = 10_000) -> Changes:
    """The next ``limit`` final changes past ``position``, read in one snapshot of the replica."""
    with replica.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        xmin, horizon = conn.execute(SNAPSHOT_SQL).one()
        if position.xid < horizon:
            return Changes({}, position, missed=True, complete=True)
        params = {"xmin": xmin, "xid": position.xid, "seq": position.seq, "limit": limit}
        # in the snapshot's transaction; SQLAlchemy types driver_connection Optional, an open connection has one
        with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            rows = cursor.execute(CHANGES_SQL, params).fetchall()
    keys: dict[str, set[str]] = {}
    for _, _, table, row_id in rows:
        keys.setdefault(table, set()).add(row_id)
    if len(rows) < limit:  # all final changes read: the position moves up to xmin
        return Changes(keys, Position(max(xmin, position.xid)), missed=False, complete=True)
    return Changes(keys, Position(rows[-1][0], rows[-1][1]), missed=False, complete=False)


def purge_changes(primary: Engine, keep: timedelta) -> int:
    """Delete changes older than ``keep`` on the primary; returns how many.

    Only changes of transactions below the purge's own snapshot xmin go, so the recorded horizon
    never passes the xmin of a snapshot that sees it (a resync from that snapshot is then past it).
    """
    with primary.begin() as conn:
        return conn.execute(PURGE_SQL, {"keep": keep}).scalar() or 0
