"""The read model's file and the primary's change capture, read from the real replica."""

import sqlite3
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from opsync.read_model.changes import Position, purge_changes, read_changes, snapshot_xmin
from opsync.read_model.store import ensure_read_model, layouts, night_of, utc_text
from opsync.registry import ingestible_tables

TZ = "America/Santiago"  # UTC-3 in (southern) summer


@pytest.mark.parametrize(
    ("moment", "night"),
    [
        ("2026-11-21T05:00:00+00:00", "2026-11-20"),  # 02:00 local: the night that began the evening before
        ("2026-11-21T02:30:00+00:00", "2026-11-20"),  # 23:30 local, same night
        ("2026-11-21T16:00:00+00:00", "2026-11-21"),  # 13:00 local: the coming night
        ("2026-11-21T14:59:59+00:00", "2026-11-20"),  # 11:59:59 local: still last night
    ],
)
def test_night_turns_over_at_local_noon(moment, night):
    assert night_of(moment, TZ) == night


@pytest.mark.parametrize(
    ("moment", "timezone", "night"),
    [
        ("0001-01-01T00:00:00.000000+00:00", TZ, None),  # its night began in year 0: none, not an error
        ("0001-01-02T00:00:00.000000+00:00", TZ, "0001-01-01"),
        ("9999-12-31T23:59:59.999999+00:00", TZ, "9999-12-31"),
        ("9999-12-31T23:59:59.999999+00:00", "Pacific/Kiritimati", None),  # UTC+14: local time in year 10000
        ("20000-01-01T00:00:00.000000+00:00", TZ, None),  # PostgreSQL holds it, Python cannot read it
    ],
)
def test_times_at_the_ends_of_the_calendar_have_a_night_or_none(moment, timezone, night):
    assert night_of(moment, timezone) == night


def test_non_finite_doubles_are_stored_as_postgresqls_text_not_null():
    """SQLite stores NaN as NULL: a NaN reading would look missing, and differ from the replica forever."""
    layout = layouts("UTC")["housekeeping_sample"]
    at = layout.data_columns.index(layout.entry.table.c.value)
    for value, stored in ((float("nan"), "NaN"), (float("inf"), "Infinity"), (float("-inf"), "-Infinity"), (1.5, 1.5)):
        row = {"id": str(uuid.uuid4()), "value": value}
        assert layout.record(row, "buffered", None, None, "")[at] == stored
        loaded = [row.get(c.name) for c in layout.data_columns]
        assert layout.loaded_record(loaded, "")[at] == stored


def test_times_are_stored_in_one_sortable_form():
    assert utc_text("2026-11-21T00:00:00-03:00") == "2026-11-21T03:00:00.000000+00:00"
    assert utc_text("2026-11-21T03:00:00Z") == utc_text("2026-11-21T03:00:00.000000+00:00")


def test_file_holds_ingestible_tables_with_sync_columns_and_facet_indexes(tmp_path):
    path = tmp_path / "opsync.db"
    ensure_read_model(path)
    conn = sqlite3.connect(path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {entry.name for entry in ingestible_tables()} | {
        "sync_metrics",
        "sync_drain_rate",
        "sync_findings",
        "sync_poison",
        "publisher_state",
    }
    assert not tables & {"api_token", "sync_ledger", "row_change", "row_change_horizon"}
    columns = [row[1] for row in conn.execute("PRAGMA table_info(executed_obs_unit)")]
    assert columns[-5:] == ["night", "_sync_state", "_txn_id", "_commit_lsn", "_updated_at"]
    indexed = {
        row[2] for index in conn.execute("PRAGMA index_list(executed_obs_unit)") for row in conn.execute(f"PRAGMA index_info({index[1]})")
    }
    assert {"instrument_module_id", "status", "_sync_state", "night", "start_time", "_txn_id"} <= indexed
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    metrics = [row[1] for row in conn.execute("PRAGMA table_info(sync_metrics)")]
    assert metrics == [
        "at",
        "buffer_depth",
        "oldest_buffered_age_s",
        "awaiting_replica",
        "dead_letters",
        "replica_lag_s",
        "poison_rows",
        "poison_skipped",
        "read_model_freshness_s",
    ]


def test_a_file_from_before_the_poison_figures_gets_their_columns_and_keeps_its_samples(tmp_path):
    path = tmp_path / "opsync.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE sync_metrics (at TEXT PRIMARY KEY, buffer_depth INTEGER, oldest_buffered_age_s REAL,"
            " awaiting_replica INTEGER, dead_letters INTEGER, replica_lag_s REAL)"
        )
        conn.execute("INSERT INTO sync_metrics (at, buffer_depth) VALUES ('2026-11-21T03:00:00+00:00', 7)")
    ensure_read_model(path)
    conn = sqlite3.connect(path)
    assert [row[1] for row in conn.execute("PRAGMA table_info(sync_metrics)")][-3:] == [
        "poison_rows",
        "poison_skipped",
        "read_model_freshness_s",
    ]
    assert conn.execute("SELECT buffer_depth, poison_rows FROM sync_metrics").fetchall() == [(7, None)]


def test_file_is_kept_in_place(tmp_path):
    path = tmp_path / "opsync.db"
    ensure_read_model(path)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO instrument (id, name) VALUES ('k', 'CHAI')")
    inode = path.stat().st_ino
    ensure_read_model(path)
    assert path.stat().st_ino == inode
    assert sqlite3.connect(path).execute("SELECT name FROM instrument").fetchall() == [("CHAI",)]


# --- change capture --------------------------------------------------------------------------------


@pytest.fixture
def primary(migrated):
    engine = create_engine(migrated.primary.url())
    yield engine
    engine.dispose()


@pytest.fixture
def replica(migrated, primary):
    """The replica, once it has replayed the migrations."""
    engine = create_engine(migrated.replica.url())
    replayed(primary, engine)
    yield engine
    engine.dispose()


def replayed(primary, replica, timeout: float = 10) -> None:
    """Wait until the replica has replayed everything the primary has written so far."""
    with primary.connect() as conn:
        lsn = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar()
    deadline = time.monotonic() + timeout
    with replica.connect() as conn:
        while not conn.execute(text("SELECT pg_last_wal_replay_lsn() >= CAST(:l AS pg_lsn)"), {"l": lsn}).scalar():
            assert time.monotonic() < deadline, "the replica did not replay in time"
            time.sleep(0.02)


def read_all(replica, position: Position) -> tuple[dict, Position]:
    """Read every final change past ``position`` (several chunks if need be)."""
    found: dict[str, set] = {}
    while True:
        changes = read_changes(replica, position, limit=3)
        for table, keys in changes.keys.items():
            found.setdefault(table, set()).update(keys)
        position = changes.position
        if changes.complete:
            return found, position


def instrument_sql(conn, key, name):
    conn.execute("INSERT INTO instrument (id, name) VALUES (%s, %s)", (key, name))


def test_plain_sql_inserts_updates_and_deletes_are_captured(migrated, primary, replica):
    start = Position(snapshot_xmin(replica))
    keys = [uuid.uuid4() for _ in range(5)]
    with migrated.primary.connect() as conn:  # "others" at the main site, not through opsync
        for key in keys:
            instrument_sql(conn, key, f"others-{key}")
        conn.commit()
        conn.execute("UPDATE instrument SET description = 'x' WHERE id = %s", (keys[0],))
        conn.execute("DELETE FROM instrument WHERE id = %s", (keys[1],))
        conn.commit()
        ops = conn.execute(
            "SELECT op, count(*) FROM row_change WHERE row_id = ANY(%s) GROUP BY op ORDER BY op", ([str(k) for k in keys],)
        ).fetchall()
        assert ops == [("DELETE", 1), ("INSERT", 5), ("UPDATE", 1)]
    replayed(primary, replica)
    found, _ = read_all(replica, start)
    assert found["instrument"] >= set(keys)


def test_a_late_commit_is_read_exactly_once(migrated, primary, replica):
    """Transaction A (smaller xid) commits after B (larger xid): a max-xid watermark would skip A."""
    start = Position(snapshot_xmin(replica))
    a_key, b_key = uuid.uuid4(), uuid.uuid4()
    with migrated.primary.connect() as a, migrated.primary.connect(autocommit=True) as b:
        instrument_sql(a, a_key, f"late-{a_key}")
        a_xid = a.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
        instrument_sql(b, b_key, f"early-{b_key}")
        b_xid = b.execute("SELECT xid FROM row_change WHERE row_id = %s", (str(b_key),)).fetchone()[0]
        assert a_xid < b_xid
        replayed(primary, replica)
        found, position = read_all(replica, start)
        assert b_key not in found.get("instrument", set()), "B must wait: A may still commit below it"
        assert position.xid <= a_xid
        a.commit()
    replayed(primary, replica)
    found, position = read_all(replica, position)
    assert {a_key, b_key} <= found["instrument"]
    again, _ = read_all(replica, position)
    assert not again.get("instrument", set()) & {a_key, b_key}


def test_an_aborted_transaction_does_not_hold_reading_back(migrated, primary, replica):
    start = Position(snapshot_xmin(replica))
    key = uuid.uuid4()
    with migrated.primary.connect() as conn:
        instrument_sql(conn, key, f"aborted-{key}")
        conn.rollback()
        instrument_sql(conn, uuid.uuid4(), f"after-{key}")
        conn.commit()
    replayed(primary, replica)
    found, position = read_all(replica, start)
    assert key not in found.get("instrument", set())
    assert position.xid > start.xid


def test_purge_keeps_recent_changes_and_raises_the_horizon(migrated, primary, replica):
    old = Position(snapshot_xmin(replica))
    with migrated.primary.connect() as conn:
        instrument_sql(conn, uuid.uuid4(), f"purged-{uuid.uuid4()}")
        conn.commit()
    assert purge_changes(primary, timedelta(days=1)) == 0
    time.sleep(0.01)
    assert purge_changes(primary, timedelta(0)) > 0
    with primary.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM row_change")).scalar() == 0
        horizon = conn.execute(text("SELECT purged_below FROM row_change_horizon")).scalar()
    assert horizon > old.xid
    replayed(primary, replica)
    assert read_changes(replica, old).missed
    assert not read_changes(replica, Position(horizon)).missed
