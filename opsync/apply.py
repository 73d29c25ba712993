"""Applying transaction envelopes to the primary, exactly once.

The ledger row and the data are written in the same database transaction: if the ledger already
holds the ``txn_id``, the envelope was applied before (a redelivery after a crash between commit
and acknowledgement) and is skipped, so redelivery never duplicates.

:func:`apply_batch` is the drainer's path: a whole batch in one DB transaction over psycopg's
pipeline mode, so its cost in round trips to a primary 200–500 ms away does not grow with its size.
"""

import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

import msgspec
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Engine, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError

from opsync import admission, registry
from opsync.buffer.codec import Change, Envelope, decode
from opsync.envelope import Op, Transaction
from opsync.errors import one_line as first_line
from opsync.lsn import CURRENT_SQL, Lsn
from opsync.schema import SyncLedger


class RowNotFound(Exception):
    """An update or delete names a row the primary does not have: a permanent error."""


def apply_transaction(conn: Connection, txn: Transaction) -> bool:
    """Apply inside the caller's DB transaction; False when the ledger says it is already applied.

    The rows go through the drainer's own statements (:func:`statements`), so a direct write and a
    drained one give PostgreSQL the same JSON and meet the same casts: admission judges one path.
    """
    claimed = conn.execute(
        insert(SyncLedger).values(txn_id=txn.txn_id, site=txn.site).on_conflict_do_nothing().returning(SyncLedger.txn_id)
    ).first()
    if claimed is None:
        return False
    conn.exec_driver_sql(NO_SUCH_ROW_FUNCTION.replace("%", "%%"), ())  # a parameterised call: % is written %%
    changes = [Change(step.op, step.table, str(step.key), step.values) for step in txn.steps]
    try:
        for statement, params in statements([Pending(str(txn.txn_id), txn.site, changes, frozenset(), frozenset())]):
            conn.exec_driver_sql(statement, tuple(params))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == NO_SUCH_ROW:
            raise RowNotFound(exc.orig.diag.message_primary) from None  # type: ignore[union-attr]  # psycopg's, as its sqlstate says
        raise
    return True


def commit(engine: Engine, txn: Transaction) -> str:
    """Apply one envelope in its own DB transaction and return the commit LSN.

    The LSN is read on the same connection right after the commit, so it is at or past the
    commit record: once a replica has replayed it, the transaction is there.
    """
    with engine.connect() as conn:
        with conn.begin():
            apply_transaction(conn, txn)
        return conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()


# --- Batches: one DB transaction, a constant number of round trips on the happy path -------------

PERMANENT_CLASSES = ("22", "23")  # data exceptions and integrity violations: retrying cannot help
NO_SUCH_ROW = "P0002"  # raised by pg_temp.opsync_no_such_row below
UNIQUE_VIOLATION = "23505"
SAVEPOINT = "opsync_range"
NO_SUCH_ROW_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.opsync_no_such_row(message text) RETURNS void LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION '%', message USING ERRCODE = 'no_data_found'; END $$
"""
LEDGER_SQL = (
    "INSERT INTO sync_ledger (txn_id, site) SELECT * FROM unnest(%s::uuid[], %s::text[]) ON CONFLICT DO NOTHING RETURNING txn_id::text"
)
REPLAYED = "OP001"  # raised by pg_temp.opsync_replayed: a batch sent whole held a transaction the ledger has
REPLAYED_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.opsync_replayed() RETURNS void LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'already in the ledger' USING ERRCODE = 'OP001'; END $$
"""
LEDGER_ALL_FRESH_SQL = (  # the ledger rows, or an error (so nothing after it runs) if any was there already
    "WITH fresh AS (" + LEDGER_SQL + ") SELECT pg_temp.opsync_replayed() FROM (SELECT count(*) AS n FROM fresh) f WHERE f.n < %s"
)
KEY_COLUMN = "opsync_key"  # a run's row keys, zipped with its rows (not a column of any table)

RowRef = tuple[str, str]  # (table, key): a row as dependencies see it


@dataclass(frozen=True, eq=False)
class Pending:
    """A buffered transaction on its way to the primary, with the rows it needs and creates worked out once.

    Compared by identity: the same txn_id may sit in two stream entries.
    """

    txn_id: str
    site: str
    steps: list[Change]
    needs: frozenset[RowRef]  # rows that must exist before it applies
    creates: frozenset[RowRef]  # rows it inserts or upserts: missing for its dependants if it fails

    @classmethod
    def read(cls, envelope: bytes) -> "Pending":
        """Decode a buffered envelope; raises :class:`UnreadableEnvelope` when it cannot be read."""
        txn = decode(envelope)
        needed, created = dependencies(txn.steps)
        return cls(str(txn.txn_id), txn.site, txn.steps, frozenset(needed), frozenset(created))


class Transient(Exception):
    """The primary cannot take the batch now (unreachable, timed out, read-only, conflict).

    Nothing was acknowledged or dead-lettered; the entries stay claimed and are redelivered, so the
    caller retries later with backoff. The commit may still have reached the primary (a link cut
    after the batch was sent, which delivers it late): the ledger skips it when redelivered.
    """


@dataclass(frozen=True)
class Failed:
    txn: Pending
    reason: str
    missing: frozenset[RowRef]  # rows it would have created: what depends on them fails too


@dataclass
class BatchResult:
    applied: list[Pending] = field(default_factory=list)
    duplicates: list[Pending] = field(default_factory=list)  # already in the ledger: skipped
    failed: list[Failed] = field(default_factory=list)  # in stream order
    commit_lsn: Lsn | None = None  # read after the commit; at or past every applied transaction
    round_trips: int = 0


def apply_batch(engine: Engine, txns: list[Pending], dead_rows: Mapping[RowRef, str] | None = None, timeout_s: float = 60) -> BatchResult:
    """Apply ``txns`` in stream order in one DB transaction; isolate the ones that fail for good.

    ``dead_rows`` maps rows created by earlier dead-lettered transactions to those transactions'
    ids: a transaction that needs one fails naming it, without a round trip. The happy path takes
    one round trip whatever the batch size (psycopg pipeline mode: ledger, rows and commit sent
    together, the ledger rows first, so a redelivered transaction stops the rest); a redelivered
    batch costs two more, a failing transaction about two more per halving (bisection under a savepoint). Raises :class:`Transient` for
    anything that is not the data's fault. ``engine`` must use psycopg 3 with a ``connect_timeout``
    (see :func:`opsync.connections.engine_options`); ``timeout_s`` bounds the whole batch, since a cut link never answers.
    """
    try:
        with engine.connect() as sa_conn:
            sa_conn = sa_conn.execution_options(isolation_level="AUTOCOMMIT")
            # SQLAlchemy types driver_connection Optional: an open connection has one (psycopg's)
            batch = Batch(cast(psycopg.Connection, sa_conn.connection.driver_connection), dict(dead_rows or {}))
            try:
                with deadline(batch.conn, timeout_s) as expired:
                    batch.run(txns)
            except psycopg.Error as exc:
                sa_conn.invalidate()
                raise Transient(transient_reason(exc, expired.is_set(), timeout_s)) from exc
    except DBAPIError as exc:
        raise Transient(f"primary unreachable: {first_line(exc.orig or exc)}") from exc
    return batch.result


class Batch:
    """One batch's DB transaction on an autocommit psycopg connection (BEGIN/SAVEPOINT/COMMIT are ours)."""

    def __init__(self, conn: psycopg.Connection, dead_rows: dict[RowRef, str]):
        self.conn = conn
        self.dead_rows = dead_rows
        self.result = BatchResult()
        self.rollback_pending = False  # the last attempt failed: roll back to the savepoint first
        self.aborted = False  # the whole-batch attempt met the ledger: roll the DB transaction back first
        self.lsn_cursor: psycopg.Cursor | None = None

    def run(self, txns: list[Pending]) -> None:
        error = self.attempt_whole(txns) if txns and not self.needs_dead(txns) else REPLAYED
        if error == REPLAYED:  # first sight of a dead letter's dependant, or a redelivery: the ledger answers first
            txns = self.without_dependants(self.claim_ledger(txns))
            error = self.attempt(txns, commit=True) if txns else REPLAYED
        if error is not None:
            self.bisect(txns)
            with self.round_trip():
                self.finish()
        self.result.commit_lsn = Lsn.parse(self.lsn_cursor.fetchone()[0])  # type: ignore[union-attr, index]  # finish() set it: one row

    def needs_dead(self, txns: list[Pending]) -> bool:
        return bool(self.dead_rows) and any(row in self.dead_rows for txn in txns for row in txn.needs)

    def attempt_whole(self, txns: list[Pending]) -> psycopg.Error | str | None:
        """The happy path in one round trip: begin, ledger rows, the batch, commit; :data:`REPLAYED` when the
        ledger held one of them (nothing applied: the DB transaction is aborted), else as :meth:`attempt`."""
        try:
            return self.attempt(txns, commit=True, ledger=True)
        except psycopg.Error as exc:
            if exc.sqlstate != REPLAYED:
                raise
            self.aborted = True
            return REPLAYED

    def claim_ledger(self, txns: list[Pending]) -> list[Pending]:
        """Begin and write the ledger rows: what the ledger already holds was applied before (redelivery)."""
        with self.round_trip():
            if self.aborted:
                self.send("ROLLBACK")
            self.send("BEGIN")
            self.send(NO_SUCH_ROW_FUNCTION)
            cursor = self.send(LEDGER_SQL, [[t.txn_id for t in txns], [t.site for t in txns]])
        fresh = {row[0] for row in cursor.fetchall()}
        todo = []
        for txn in txns:
            if txn.txn_id in fresh:
                fresh.discard(txn.txn_id)  # a second entry of the same txn_id is a duplicate too
                todo.append(txn)
            else:
                self.result.duplicates.append(txn)
        return todo

    def bisect(self, txns: list[Pending]) -> None:
        """Apply ``txns`` in order, halving a failing range down to the transaction at fault."""
        txns = self.without_dependants(txns)
        if not txns:
            return
        error = self.attempt(txns)
        if error is None:
            return
        if len(txns) == 1:
            self.fail(txns[0], permanent_reason(error), error)
            return
        middle = len(txns) // 2
        self.bisect(txns[:middle])
        self.bisect(txns[middle:])

    def attempt(self, txns: list[Pending], commit: bool = False, ledger: bool = False) -> psycopg.Error | None:
        """One round trip: the range under a savepoint, and the commit when asked; the permanent error if any.

        With ``ledger``, the DB transaction begins here and every ledger row must be new (else :data:`REPLAYED`).
        """
        try:
            with self.round_trip():
                if ledger:
                    self.send("BEGIN")
                    self.send(NO_SUCH_ROW_FUNCTION)
                    self.send(REPLAYED_FUNCTION)
                    self.send(LEDGER_ALL_FRESH_SQL, [[t.txn_id for t in txns], [t.site for t in txns], len(txns)])
                if self.rollback_pending:
                    self.send(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
                self.send(f"SAVEPOINT {SAVEPOINT}")
                for statement, params in statements(txns):
                    self.send(statement, params)
                self.send(f"RELEASE SAVEPOINT {SAVEPOINT}")
                if commit:
                    self.finish()
        except psycopg.Error as exc:
            if not is_permanent(exc):
                raise
            self.rollback_pending = True
            return exc
        self.rollback_pending = False
        self.result.applied += txns
        return None

    def finish(self) -> None:
        """Commit, then read the WAL position on the same connection: at or past the commit record.

        Dead-lettered transactions leave the ledger, so a requeue after fixing the cause applies them.
        """
        if self.rollback_pending:
            self.send(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        if failed := [f.txn.txn_id for f in self.result.failed]:
            self.send("DELETE FROM sync_ledger WHERE txn_id = ANY(%s::uuid[])", [failed])
        self.send("COMMIT")
        self.lsn_cursor = self.send(CURRENT_SQL)

    def fail(self, txn: Pending, reason: str, error: psycopg.Error | None = None) -> None:
        """Dead-letter ``txn``; the rows it would have created are missing for later ones, unless the
        failure was that one already exists (inserted by someone else: those who need it are fine)."""
        exists = (error.diag.message_detail or "") if error is not None and error.sqlstate == UNIQUE_VIOLATION else ""
        missing = frozenset(row for row in txn.creates if f"({registry.get_table(row[0]).key.name})=({row[1]})" not in exists)
        self.result.failed.append(Failed(txn, reason, missing))
        self.dead_rows |= dict.fromkeys(missing, txn.txn_id)

    def without_dependants(self, txns: list[Pending]) -> list[Pending]:
        """Fail, naming it, each transaction that needs a row a dead-lettered transaction would have created."""
        if not self.dead_rows:
            return txns
        kept = []
        for txn in txns:
            owner = next((self.dead_rows[row] for row in txn.needs if row in self.dead_rows), None)
            if owner is None:
                kept.append(txn)
            else:
                self.fail(txn, f"depends on dead-lettered transaction {owner}")
        return kept

    def send(self, query, params=None) -> psycopg.Cursor:
        """Never prepared: a statement prepared in a pipeline that then aborts would be remembered but missing."""
        return self.conn.execute(query, params, prepare=False)

    @contextmanager
    def round_trip(self) -> Iterator[None]:
        """Everything sent inside goes in one pipeline, answered at one sync."""
        self.result.round_trips += 1
        with self.conn.pipeline():
            yield


def dependencies(steps: list[Change]) -> tuple[set[RowRef], set[RowRef]]:
    """In one pass, the rows that must exist before ``steps`` apply (targets of updates and deletes, rows
    their foreign keys name, unless created by the steps themselves) and the rows they create."""
    needed: set[RowRef] = set()
    created: set[RowRef] = set()
    for step in steps:
        (created if step.op is Op.insert or step.op is Op.upsert else needed).add((step.table, step.key))
        values = step.values
        for column, referred in references(step.table):
            if (value := values.get(column)) is not None:
                needed.add((referred, row_key(value)))
    return needed - created, created


CANONICAL_KEY = re.compile("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def row_key(value: Any) -> Any:
    """A foreign key as sent (envelopes keep any spelling uuid_in takes: upper case, braces) as rows are named."""
    if isinstance(value, str) and not CANONICAL_KEY.fullmatch(value):
        try:
            return admission.judge_uuid(value)
        except admission.Refused:
            return value  # the primary refuses it, naming it
    return value


def creates(txn: Envelope) -> set[RowRef]:
    """Rows ``txn`` inserts or upserts (as the drainer names them: keys as text)."""
    return {(step.table, str(step.key)) for step in txn.steps if step.op in (Op.insert, Op.upsert)}


@lru_cache
def references(table: str) -> tuple[tuple[str, str], ...]:
    """(column, referred table) of each foreign key of an ingestible table."""
    return tuple((column.key, fk.column.table.name) for column in registry.get_table(table).table.columns for fk in column.foreign_keys)


def statements(txns: list[Pending]) -> Iterator[tuple[str, list]]:
    """As few statements as the stream order allows, whatever the number of transactions.

    Inserts between two other changes are grouped by table and columns, parent tables first:
    together they make the same rows as in stream order, in one statement per table. Updates,
    deletes and upserts see every change before them, so they merge only with consecutive steps
    of the same shape, and a key seen twice starts a new statement (one statement cannot change
    a row twice).
    """
    inserts: dict[tuple, list[Change]] = {}
    run: list[Change] = []
    keys: set = set()
    for step in (step for txn in txns for step in txn.steps):
        if step.op is Op.insert:
            if run:
                yield run_statement(run)
                run, keys = [], set()
            inserts.setdefault(shape(step), []).append(step)
            continue
        if inserts:
            yield from grouped(inserts)
            inserts = {}
        if run and (shape(step) != shape(run[0]) or step.key in keys):
            yield run_statement(run)
            run, keys = [], set()
        run.append(step)
        keys.add(step.key)
    yield from grouped(inserts)
    if run:
        yield run_statement(run)


def grouped(inserts: dict[tuple, list[Change]]) -> Iterator[tuple[str, list]]:
    for key in sorted(inserts, key=lambda key: table_rank()[key[1]]):
        yield run_statement(inserts[key])


@lru_cache
def table_rank() -> dict[str, int]:
    """Position of each ingestible table in foreign-key order: referenced tables first."""
    return {entry.name: rank for rank, entry in enumerate(registry.ingestible_tables())}


def shape(step: Change) -> tuple:
    return step.op, step.table, tuple(sorted(step.values))


def run_statement(run: list[Change]) -> tuple[str, list]:
    """Keys as one array and, but for deletes, the values as one JSON array beside it: no row is rebuilt."""
    op, table, columns = shape(run[0])
    keys = [step.key for step in run]
    if op is Op.delete:
        return step_sql(op, table, columns), [keys]
    return step_sql(op, table, columns), [keys, Jsonb([step.values for step in run], dumps=msgspec.json.encode)]


@lru_cache(maxsize=256)
def step_sql(op: Op, table: str, columns: tuple[str, ...]) -> str:
    """The statement of a run: keys arrive as one array and rows as one JSON array typed by the table's row
    type, zipped by ``ROWS FROM`` (cached as text)."""
    return compose_step_sql(op, table, columns).as_string()


def compose_step_sql(op: Op, table: str, columns: tuple[str, ...]) -> sql.Composed:
    entry = registry.get_table(table)
    t, key, pk = sql.Identifier(table), sql.Identifier(KEY_COLUMN), sql.Identifier(entry.key.name)
    kind = sql.SQL(entry.key_sql)  # uuid or text: a registered type name, never input
    missing = sql.SQL(
        "SELECT pg_temp.opsync_no_such_row({message} || k.{key} || ': no such row') FROM k WHERE k.{key} NOT IN (SELECT {pk} FROM done)"
    ).format(message=sql.Literal(f"{op} of {table} "), key=key, pk=pk)
    if op is Op.delete:
        return (
            sql.SQL(
                "WITH k AS (SELECT unnest(%s::{kind}[]) AS {key}),"
                " done AS (DELETE FROM {t} USING k WHERE {t}.{pk} = k.{key} RETURNING {t}.{pk}) "
            ).format(t=t, key=key, pk=pk, kind=kind)
            + missing
        )
    rows = sql.SQL("ROWS FROM (unnest(%s::{kind}[]), jsonb_populate_recordset(NULL::{t}, %s)) AS k({key})").format(t=t, key=key, kind=kind)
    stamp = [sql.SQL("{c} = {e}").format(c=sql.Identifier(c), e=sql.SQL(e)) for c, e in stamped_columns(entry)]
    if op is Op.update:
        sets = [sql.SQL("{c} = k.{c}").format(c=sql.Identifier(c)) for c in columns] + stamp
        return (
            sql.SQL(
                "WITH k AS (SELECT * FROM {rows}), done AS (UPDATE {t} SET {sets} FROM k WHERE {t}.{pk} = k.{key} RETURNING {t}.{pk}) "
            ).format(rows=rows, t=t, sets=sql.SQL(", ").join(sets), key=key, pk=pk)
            + missing
        )
    names = sql.SQL(", ").join(map(sql.Identifier, (entry.key.name, *columns)))
    values = sql.SQL(", ").join([sql.SQL("k.{}").format(key), *(sql.SQL("k.{}").format(sql.Identifier(c)) for c in columns)])
    insert = sql.SQL("INSERT INTO {t} ({names}) SELECT {values} FROM {rows}").format(t=t, names=names, values=values, rows=rows)
    if op is Op.insert:
        return insert
    changes = [sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in columns] + stamp
    if not changes:
        return insert + sql.SQL(" ON CONFLICT ({pk}) DO NOTHING").format(pk=pk)
    return insert + sql.SQL(" ON CONFLICT ({pk}) DO UPDATE SET ").format(pk=pk) + sql.SQL(", ").join(changes)


def stamped_columns(entry: registry.Ingestible) -> list[tuple[str, str]]:
    """(column, SQL) of the columns the model sets by an SQL expression on every update (``onupdate=func.now()``):
    the run's UPDATE must set them itself, as the ORM would."""
    return [
        (c.name, str(c.onupdate.arg.compile(dialect=postgresql.dialect())))  # type: ignore[attr-defined]  # a clause, checked
        for c in entry.table.columns
        if c.onupdate is not None and c.onupdate.is_clause_element
    ]


def is_permanent(exc: psycopg.Error) -> bool:
    return exc.sqlstate is not None and (exc.sqlstate.startswith(PERMANENT_CLASSES) or exc.sqlstate == NO_SUCH_ROW)


def permanent_reason(exc: psycopg.Error) -> str:
    """The database's own words: the message and, when there is one, the detail naming the values."""
    detail = exc.diag.message_detail
    return f"{exc.diag.message_primary}" + (f" ({detail})" if detail else "")


def transient_reason(exc: psycopg.Error, expired: bool, timeout_s: float) -> str:
    if expired:
        return f"primary did not answer within {timeout_s:g} s (link down or too slow); the batch stays buffered"
    what = f"SQLSTATE {exc.sqlstate}: " if exc.sqlstate else ""
    return f"primary unavailable: {what}{first_line(exc)}; the batch stays buffered"


@contextmanager
def deadline(conn: psycopg.Connection, seconds: float) -> Iterator[threading.Event]:
    """Shut the connection's socket down when time is up, so a silent link ends in an error.

    A blackholed link answers nothing and TCP would wait many minutes; shutting the socket
    down makes the pending read fail at once. The returned event says whether it fired.
    """
    expired = threading.Event()
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))

    def expire() -> None:
        expired.set()
        sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()
        timer.join()
        sock.close()
