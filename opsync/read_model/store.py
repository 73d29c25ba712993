"""The read model Datasette serves: one SQLite file in WAL mode, written by a single publisher.

WAL lets Datasette read while the publisher writes, and Datasette sees external commits without a
restart; the file is only ever modified in place, never replaced (a renamed-over file would leave
Datasette reading the old inode).

Each ingestible table is a real, indexed table (a UNION view made facets take seconds) with the
table's columns (its key first), then the derived ``night`` where its domain declares one, then ``_sync_state`` (buffered /
committed / replicated / failed), ``_txn_id``, ``_commit_lsn`` and ``_updated_at`` (when the
publisher last changed the row). Values are stored in one canonical form whatever their source
(replica or buffer): times as UTC ISO text with microseconds (so they sort and compare as text),
JSON as compact text with sorted keys, booleans as 0/1. Internal tables of the primary (tokens,
ledger, change capture) are not ingestible and so never reach this file.
"""

import json
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from sqlalchemy import Column, ColumnElement, Integer, Select, Text, UniqueConstraint, bindparam, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, psycopg
from sqlalchemy.sql.sqltypes import JSON

from opsync.read_model.tables import DRAIN_RATE, FINDINGS, METRICS, POISON, STATE
from opsync.registry import Ingestible, ingestible_tables

SYNC_COLUMNS = ("_sync_state", "_txn_id", "_commit_lsn", "_updated_at")
UNSETTLED = ("buffered", "committed", "failed")  # states backed by the buffer's overlay, not (only) the replica
CHUNK = 5000  # keys per statement: well below SQLite's limit of bound variables
UTC_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'  # PostgreSQL's to_char for what utc_text writes
METRICS_DDL = f"""
CREATE TABLE IF NOT EXISTS {METRICS} (
    at TEXT PRIMARY KEY,  -- UTC, ISO
    buffer_depth INTEGER,
    oldest_buffered_age_s REAL,
    awaiting_replica INTEGER,
    dead_letters INTEGER,
    replica_lag_s REAL,
    poison_rows INTEGER,
    poison_skipped INTEGER,
    read_model_freshness_s REAL
)"""
ADDED_METRICS = {"poison_rows": "INTEGER", "poison_skipped": "INTEGER", "read_model_freshness_s": "REAL"}  # for older files
POISON_DDL = (
    f"CREATE TABLE IF NOT EXISTS {POISON} (table_name TEXT NOT NULL, key TEXT NOT NULL, duty TEXT NOT NULL, reason TEXT NOT NULL,"
    " at TEXT NOT NULL, PRIMARY KEY (table_name, key))"
)
NOON = timedelta(hours=12)
# A row the SQLite write refuses (a value it cannot bind or store); OperationalError (locked, disk full) is no row's fault
WRITE_POISON = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    ValueError,
    TypeError,
    OverflowError,
)
DRAIN_DDL = (  # the drainer's figures (monitoring.drain_metrics) and the alert findings (monitoring.alerts), as Redis has them
    f"CREATE TABLE IF NOT EXISTS {DRAIN_RATE} (minute TEXT PRIMARY KEY, records_applied INTEGER NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {FINDINGS} (figure TEXT PRIMARY KEY, value REAL, level TEXT NOT NULL, message TEXT NOT NULL,"
    " evaluated_at TEXT NOT NULL)",
)


def utc_text(value: datetime | str) -> str:
    """One text form for every time, so SQLite compares and sorts them correctly."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def night_of(moment: str, timezone: str) -> str | None:
    """The observing night a time belongs to, named by the local date it began on.

    Nights turn over at local noon: an observation at 02:00 local belongs to the night that began
    the evening before. A time whose night lies outside Python's calendar (hours from the start of
    year 1, or past 9999) or that it cannot read (year 10000 on, as PostgreSQL allows) has none
    (NULL): an odd time must not make its row unpublishable.
    """
    try:
        return (datetime.fromisoformat(moment) - NOON).astimezone(ZoneInfo(timezone)).date().isoformat()
    except (ValueError, OverflowError):
        return None


NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def float_value(value: float) -> float | str:
    """A double as stored: SQLite turns NaN into NULL, so the non-finite ones are kept as PostgreSQL's
    text for them (``NaN``, ``Infinity``, ``-Infinity``), which a reader can tell from a missing value."""
    return NON_FINITE[repr(value)] if isinstance(value, float) and not math.isfinite(value) else value


def converter(column: Column):
    """How one column's value (native, from the replica, or JSON-ready, from the buffer) is stored."""
    if isinstance(column.type, JSON):
        return json_text
    kind = column.type.python_type
    if kind is datetime:
        return utc_text
    if kind is UUID:
        return str
    if kind is bool:
        return int
    if kind is float:
        return float_value
    return None


def sqlite_type(column: Column) -> str:
    kind = column.type.python_type
    if kind in (bool, int):
        return "INTEGER"
    return "REAL" if kind is float else "TEXT"


def indexed_columns(table) -> list[str]:
    """Columns indexed, unique or referencing in the primary: the usual facets and filters here too."""
    names = {c.name for index in table.indexes for c in index.columns}
    names |= {c.name for u in table.constraints if isinstance(u, UniqueConstraint) for c in u.columns}
    names |= {c.name for c in table.columns if c.foreign_keys}
    return [c.name for c in table.columns if c.name in names and not c.primary_key]


@dataclass(frozen=True)
class Layout:
    """How one ingestible table is materialised, and how a row becomes a stored record."""

    entry: Ingestible
    timezone: str

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def key(self) -> str:
        return self.entry.key.name

    @cached_property
    def data_columns(self) -> list[Column]:
        """The table's columns, its key first: a stored record's first value is its key."""
        key = self.entry.key
        return [key, *(c for c in self.entry.table.columns if c is not key)]

    @cached_property
    def night_source(self) -> str | None:
        return self.entry.night_of

    @cached_property
    def columns(self) -> list[str]:
        night = ["night"] if self.night_source else []
        return [c.name for c in self.data_columns] + night + list(SYNC_COLUMNS)

    @cached_property
    def conversions(self) -> list[tuple[int, Any]]:
        """(position, converter) of the columns whose stored form differs from their JSON-ready value."""
        found = [(i, converter(c)) for i, c in enumerate(self.data_columns)]
        return [(i, convert) for i, convert in found if convert is not None]

    @cached_property
    def json_positions(self) -> list[int]:
        return [i for i, c in enumerate(self.data_columns) if isinstance(c.type, JSON)]

    @cached_property
    def float_positions(self) -> list[int]:
        return [i for i, c in enumerate(self.data_columns) if not isinstance(c.type, JSON) and c.type.python_type is float]

    def record(self, row: Mapping[str, Any], state: str, txn_id: str | None, lsn: str | None, at: str) -> tuple:
        """A row as stored; ``row`` maps column names to values (missing ones are NULL)."""
        values = [row.get(c.name) for c in self.data_columns]
        for i, convert in self.conversions:
            if values[i] is not None:
                values[i] = convert(values[i])
        return self.finish(values, state, txn_id, lsn, at)

    def loaded_record(self, row: Sequence[Any], at: str) -> tuple:
        """A row of :meth:`load_query`, already in stored form but for JSON: the full load's fast path."""
        floats = self.float_positions
        odd = any(isinstance(row[i], float) and not math.isfinite(row[i]) for i in floats)
        if not self.json_positions and self.night_position is None and not odd:  # most rows: nothing to convert
            return (*row, "replicated", None, None, at)
        values = list(row)
        for i in self.json_positions:
            if values[i] is not None:
                values[i] = json_text(values[i])
        if odd:
            for i in floats:
                values[i] = float_value(values[i])
        return self.finish(values, "replicated", None, None, at)

    @cached_property
    def key_position(self) -> int:
        return self.columns.index(self.key)

    @cached_property
    def night_position(self) -> int | None:
        return self.columns.index(self.night_source) if self.night_source else None

    def finish(self, values: list, state: str, txn_id: str | None, lsn: str | None, at: str) -> tuple:
        if self.night_position is not None:
            moment = values[self.night_position]
            values.append(night_of(moment, self.timezone) if moment else None)
        values += (state, txn_id, lsn, at)
        return tuple(values)

    def formatted(self) -> Select:
        """Every column, keys and times formatted by PostgreSQL as stored here (cheaper than in Python).

        Columns keep their names, so a row also serves as the replica's side of a merge.
        """
        columns: list[ColumnElement[Any]] = []
        for column in self.data_columns:
            kind = None if isinstance(column.type, JSON) else column.type.python_type
            if kind is UUID:
                columns.append(cast(column, Text).label(column.name))
            elif kind is datetime:
                columns.append(func.to_char(func.timezone("UTC", column), UTC_FORMAT).label(column.name))
            elif kind is bool:
                columns.append(cast(column, Integer).label(column.name))
            else:
                columns.append(column)
        return select(*columns)

    def load_query(self) -> Select:
        """All rows in key order, formatted as stored (:meth:`formatted`)."""
        return self.formatted().order_by(self.entry.key_order)

    def keyed_query(self) -> Select:
        """:meth:`formatted` rows for the keys in ``ids``, one text of comma-separated keys: a single string is
        sent and split and cast by PostgreSQL (cheaper than an array parameter of 10,000 keys built here).
        ``IN (SELECT unnest(…))`` rather than ``= ANY(…)``: the planner then probes the key index per key;
        with ``ANY`` of 10,000 keys it chose a parallel scan of the whole table for every chunk.
        Unordered: callers key the rows, and a sort of 10,000 rows per fetch is time for nothing.
        Natural keys may hold commas: theirs is a JSON array (:meth:`ids_text`)."""
        key = self.entry.key
        if not self.entry.uuid_key:
            return self.formatted().where(key.in_(select(func.jsonb_array_elements_text(cast(bindparam("ids", type_=Text), JSONB)))))
        keys = cast(func.string_to_array(bindparam("ids", type_=Text), ","), ARRAY(key.type))
        return self.formatted().where(key.in_(select(func.unnest(keys))))

    def ids_text(self, keys: list[str]) -> str:
        """The ``ids`` parameter of :meth:`keyed_query`: UUIDs comma-separated, natural keys as a JSON array."""
        return ",".join(keys) if self.entry.uuid_key else json.dumps(keys)

    @cached_property
    def keyed_sql(self) -> tuple[str, dict[str, Any]]:
        """:meth:`keyed_query` compiled once for psycopg, and its fixed parameters: run on the driver's cursor,
        its rows are plain tuples (SQLAlchemy's rows cost more than the query on the catch-up path)."""
        compiled = self.keyed_query().compile(dialect=psycopg.dialect())
        return str(compiled), {k: v for k, v in compiled.params.items() if k != "ids"}

    def create_sql(self) -> str:
        types = {c.name: sqlite_type(c) for c in self.data_columns}
        defs = [f'"{name}" {types.get(name, "TEXT")}' + (" PRIMARY KEY" if name == self.key else "") for name in self.columns]
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({", ".join(defs)})'

    @cached_property
    def indexes(self) -> dict[str, str]:
        """Index name -> CREATE statement: the primary's indexed columns, the declared facets, the sync columns and the night."""
        primary = indexed_columns(self.entry.table)
        indexes = [[name] for name in primary + [f for f in self.entry.facets if f not in primary]]
        indexes += [["_sync_state", self.key], ["_txn_id"]] + ([["night"]] if self.night_source else [])
        names = [f"ix_{self.name}_{'_'.join(cols).strip('_')}" for cols in indexes]
        return {
            name: f'CREATE INDEX IF NOT EXISTS "{name}" ON "{self.name}" ({", ".join(cols)})'
            for name, cols in zip(names, indexes, strict=True)
        }

    @cached_property
    def upsert_sql(self) -> str:
        names = ", ".join(f'"{c}"' for c in self.columns)
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in self.columns if c != self.key)
        marks = ", ".join("?" * len(self.columns))
        return f'INSERT INTO "{self.name}" ({names}) VALUES ({marks}) ON CONFLICT("{self.key}") DO UPDATE SET {updates}'

    @cached_property
    def merge_sql(self) -> str:
        """:attr:`upsert_sql` that leaves a row alone (``_updated_at`` too) when nothing else differs: SQLite
        compares inside the write, instead of the rows being read back and compared here first."""
        compared = [f'"{c}"' for c in self.columns if c not in (self.key, "_updated_at")]
        ours, theirs = ", ".join(compared), ", ".join(f"excluded.{c}" for c in compared)
        return f"{self.upsert_sql} WHERE ({ours}) IS NOT ({theirs})"


def layouts(timezone: str) -> dict[str, Layout]:
    return {entry.name: Layout(entry, timezone) for entry in ingestible_tables()}


def ensure_read_model(path: Path) -> None:
    """Create the file (WAL mode) and its tables and indexes where missing; existing data is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        for layout in layouts("UTC").values():
            conn.execute(layout.create_sql())
            for sql in layout.indexes.values():
                conn.execute(sql)
        conn.execute(METRICS_DDL)
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({METRICS})")}
        for name, kind in ADDED_METRICS.items():
            if name not in have:
                conn.execute(f"ALTER TABLE {METRICS} ADD COLUMN {name} {kind}")
        conn.execute(POISON_DDL)
        for ddl in DRAIN_DDL:
            conn.execute(ddl)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {STATE} (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.commit()
    finally:
        conn.close()


Refused = Callable[[str, Exception], None]  # told the key of each record the file refused, and why


def write(conn: sqlite3.Connection, layout: Layout, sql: str, records: list[tuple], refused: Refused | None) -> None:
    """``sql`` for every record at once; if the file refuses one, each alone, the refused ones skipped and reported.

    A savepoint undoes the part of the batch written before the refusal, so nothing is written twice;
    SQLite undoes a refused statement by itself."""
    if refused is None:
        conn.executemany(sql, records)
        return
    conn.execute("SAVEPOINT publish")
    try:
        conn.executemany(sql, records)
    except WRITE_POISON:
        conn.execute("ROLLBACK TO publish")
        for record in records:
            try:
                conn.execute(sql, record)
            except WRITE_POISON as exc:
                refused(record[layout.key_position], exc)
    conn.execute("RELEASE publish")


def chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ReadModel:
    """The publisher's connection to the file: the only writer."""

    def __init__(self, path: Path, timezone: str):
        ensure_read_model(path)
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints; the model can be rebuilt
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.execute("PRAGMA wal_autocheckpoint=10000")  # fewer, larger checkpoints: pages rewritten by consecutive chunks copied once
        self.layouts = layouts(timezone)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; inside another one it is part of it (a repair holds the write lock
        from its replica read to its write, so a publisher's newer write cannot come in between)."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def is_empty(self) -> bool:
        return not any(self.conn.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone() for name in self.layouts)

    def get_state(self, name: str) -> str | None:
        found = self.conn.execute(f"SELECT value FROM {STATE} WHERE name = ?", (name,)).fetchone()
        return found[0] if found else None

    def set_state(self, conn: sqlite3.Connection, name: str, value: str) -> None:
        sql = f"INSERT INTO {STATE} (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"
        conn.execute(sql, (name, value))

    def insert(self, conn: sqlite3.Connection, layout: Layout, records: list[tuple], refused: Refused | None = None) -> None:
        """The full load's fast path: plain inserts into an empty table."""
        write(conn, layout, layout.upsert_sql, records, refused)

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Secondary indexes dropped while an empty file is filled, built once after: faster than maintaining them."""
        with self.transaction() as conn:
            for layout in self.layouts.values():
                for name in layout.indexes:
                    conn.execute(f'DROP INDEX IF EXISTS "{name}"')
        try:
            yield
        finally:  # an interrupted load is finished by a resync, which needs the indexes as much as readers do
            with self.transaction() as conn:
                for layout in self.layouts.values():
                    for sql in layout.indexes.values():
                        conn.execute(sql)

    def apply(self, layout: Layout, keys: Iterable[str], records: dict[str, tuple], refused: Refused | None = None) -> int:
        """Make ``keys`` hold ``records`` (absent from it: deleted); rows whose values are unchanged are left as
        they are (:attr:`Layout.merge_sql`); a record the file refuses is skipped and handed to ``refused``
        (without it, the error is raised). Returns rows written."""
        gone = [(k,) for k in keys if k not in records]
        if not records and not gone:
            return 0
        with self.transaction() as conn:
            before = conn.total_changes
            write(conn, layout, layout.merge_sql, list(records.values()), refused)
            conn.executemany(f'DELETE FROM "{layout.name}" WHERE "{layout.key}" = ?', gone)
            return conn.total_changes - before

    def keys_of_txns(self, layout: Layout, txn_ids: list[str]) -> list[str]:
        keys = []
        for part in chunks(txn_ids):
            sql = f'SELECT "{layout.key}" FROM "{layout.name}" WHERE _txn_id IN ({", ".join("?" * len(part))})'
            keys += [row[0] for row in self.conn.execute(sql, part)]
        return keys

    def unsettled_keys(self, layout: Layout, after: str, limit: int) -> list[str]:
        """Rows whose state comes from the buffer, past ``after`` in key order: the sweep re-checks them."""
        marks = ", ".join("?" * len(UNSETTLED))
        key = f'"{layout.key}"'
        sql = f'SELECT {key} FROM "{layout.name}" WHERE _sync_state IN ({marks}) AND {key} > ? ORDER BY {key} LIMIT ?'
        return [row[0] for row in self.conn.execute(sql, (*UNSETTLED, after, limit))]

    def keys_between(self, layout: Layout, after: str, upto: str | None) -> list[str]:
        """Keys in ``(after, upto]`` (to the end when ``upto`` is None): what a resync compares."""
        key = f'"{layout.key}"'
        if upto is None:
            return [r[0] for r in self.conn.execute(f'SELECT {key} FROM "{layout.name}" WHERE {key} > ?', (after,))]
        sql = f'SELECT {key} FROM "{layout.name}" WHERE {key} > ? AND {key} <= ?'
        return [r[0] for r in self.conn.execute(sql, (after, upto))]

    def records_between(self, layout: Layout, after: str, upto: str | None, width: int) -> dict[str, tuple]:
        """Rows with keys in ``(after, upto]`` (to the end when ``upto`` is None), in key order, their first
        ``width`` columns: what a check compares with the replica."""
        names = ", ".join(f'"{c}"' for c in layout.columns[:width])
        key = f'"{layout.key}"'
        sql = f'SELECT {names} FROM "{layout.name}" WHERE {key} > ?' + (f" AND {key} <= ?" if upto else "") + f" ORDER BY {key}"
        return {row[0]: row for row in self.conn.execute(sql, (after, upto) if upto else (after,))}

    def append_metrics(self, at: str, figures: Mapping[str, Any], keep_days: int) -> None:
        """One sample for the dashboards; samples older than ``keep_days`` go, so the table stays small."""
        names = ["at", *figures]
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO {METRICS} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                (at, *figures.values()),
            )
            conn.execute(f"DELETE FROM {METRICS} WHERE at < strftime('%Y-%m-%dT%H:%M:%f', 'now', ?)", (f"-{keep_days} days",))

    def store_poison(self, rows: Iterable[tuple[str, str, str, str, str]]) -> None:
        """The rows the publisher skips now (``(table, key, duty, reason, at)``), replacing the previous list."""
        with self.transaction() as conn:
            conn.execute(f"DELETE FROM {POISON}")
            conn.executemany(f"INSERT INTO {POISON} (table_name, key, duty, reason, at) VALUES (?, ?, ?, ?, ?)", rows)

    def store_drain(self, rate: Iterable[tuple[str, int]], findings: Iterable[tuple], keep_days: int) -> None:
        """Records applied per minute (``(minute, count)``, upserted: the current minute grows) and the latest
        findings (``(figure, value, level, message, evaluated_at)``, replacing the previous ones)."""
        with self.transaction() as conn:
            conn.executemany(f"INSERT OR REPLACE INTO {DRAIN_RATE} (minute, records_applied) VALUES (?, ?)", rate)
            conn.execute(f"DELETE FROM {DRAIN_RATE} WHERE minute < strftime('%Y-%m-%dT%H:%M', 'now', ?)", (f"-{keep_days} days",))
            if findings := list(findings):
                conn.execute(f"DELETE FROM {FINDINGS}")
                conn.executemany(f"INSERT INTO {FINDINGS} VALUES (?, ?, ?, ?, ?)", findings)
