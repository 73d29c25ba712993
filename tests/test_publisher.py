"""The read-model publisher against real services: the ingest API over HTTP, a Redis of its own, the
PostgreSQL primary and streaming replica, and a real ``datasette serve`` running the plugin."""

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from opsync import drain
from opsync.buffer import Buffer
from opsync.read_model.publisher import Publisher, Tuning
from opsync.read_model.store import ReadModel, ensure_read_model, layouts
from tests.conftest import free_port, wait_for

TABLE = "executed_obs_unit"
FAST = Tuning(change_every_s=0.1, sweep_every_s=0.3, metrics_every_s=0.3, max_backoff_s=1.0)
REPO = Path(__file__).resolve().parents[1]


class FileReader:
    """What Datasette sees: a separate read-only connection to the file."""

    def __init__(self, path: Path):
        self.path = path

    def query(self, sql: str, params=()) -> list[dict]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(sql, params)]
        finally:
            conn.close()

    def rows(self, table: str, ids) -> list[dict]:
        ids = [str(i) for i in ids]
        return self.query(f'SELECT * FROM "{table}" WHERE id IN ({", ".join("?" * len(ids))}) ORDER BY id', ids)

    def row(self, table: str, key) -> dict | None:
        found = self.rows(table, [key])
        return found[0] if found else None

    def loaded(self) -> bool:
        try:
            return bool(self.query("SELECT 1 FROM publisher_state WHERE name = 'changes'"))
        except sqlite3.OperationalError:  # the file exists, its tables not yet
            return False


@pytest.fixture
def replica(site_env, primary_engine):
    engine = create_engine(site_env.replica_url.get_secret_value(), pool_pre_ping=True, connect_args={"connect_timeout": 3})
    yield engine
    engine.dispose()


@pytest.fixture
def model_path(tmp_path) -> Path:
    return tmp_path / "opsync.db"


@pytest.fixture
def reader(model_path) -> FileReader:
    return FileReader(model_path)


@pytest.fixture
def buffer(own_redis) -> Buffer:
    return Buffer(own_redis.client())  # the prefix the API writes under


@pytest.fixture
def start_publisher(own_redis, site_env, model_path, reader):
    """Runs a publisher in a thread on this test's file and Redis, as Datasette's plugin would."""
    running = []

    def start(**tuning) -> Publisher:
        replica = create_engine(site_env.replica_url.get_secret_value(), pool_pre_ping=True, connect_args={"connect_timeout": 3})
        publisher = Publisher(ReadModel(model_path, site_env.timezone), Buffer(own_redis.client()), replica, None, replace(FAST, **tuning))
        stop = threading.Event()
        thread = threading.Thread(target=publisher.run, args=(stop,), name="publisher", daemon=True)
        thread.start()
        running.append((stop, thread))
        wait_for(lambda: model_path.exists() and reader.loaded(), what="the full load")
        return publisher

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(30)


@pytest.fixture
def post(live_api, auth_headers):
    headers = auth_headers(TABLE)

    def send(method: str, path: str, body) -> dict:
        response = httpx.request(method, f"{live_api}{path}", json=body, headers=headers, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()

    return send


def replica_records(replica, table: str, ids) -> dict[str, tuple]:
    """Rows as the read model must hold them once replicated (all but ``_updated_at``)."""
    layout = layouts("America/Santiago")[table]
    query = select(layout.entry.table).where(layout.entry.table.c.id.in_([uuid.UUID(str(i)) for i in ids]))
    with replica.connect() as conn:
        return {str(r.id): layout.record(r._mapping, "replicated", None, None, "")[:-1] for r in conn.execute(query)}


def file_records(reader: FileReader, table: str, ids) -> dict[str, tuple]:
    return {row["id"]: tuple(row.values())[:-1] for row in reader.rows(table, ids)}


def replica_ids(replica, table: str) -> list[str]:
    with replica.connect() as conn:
        return [str(i) for i in conn.scalars(text(f"SELECT id FROM {table}"))]


def caught_up(replica, reader, table: str, ids) -> bool:
    return file_records(reader, table, ids) == replica_records(replica, table, ids)


def confirm_all(buffer: Buffer, replica, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while drain.confirm_replica(buffer, replica).remaining:
        assert time.monotonic() < deadline, "transactions still await the replica"
        time.sleep(0.05)


def test_full_load_equals_the_replica(start_publisher, reader, replica, primary_engine, planning):
    start_publisher()
    for table in layouts("UTC"):
        ids = replica_ids(replica, table)
        assert len(reader.query(f'SELECT id FROM "{table}"')) >= len(ids)
        assert file_records(reader, table, ids) == replica_records(replica, table, ids), table
    night = reader.row("obs_unit", planning["obs_unit"])
    assert night["_sync_state"] == "replicated" and night["_txn_id"] is None


def test_buffered_row_and_its_updates_show_at_once(start_publisher, reader, post, observation):
    """Within a generous bound; the figure (under a second after the 202) is bench/read.py's visible_p95_s."""
    start_publisher()
    sent = time.monotonic()
    receipt = post("POST", f"/v1/records/{TABLE}", observation(metadata={"seeing": 0.8}))
    accepted = time.monotonic()
    row = wait_for(lambda: reader.row(TABLE, receipt["ids"][0]), timeout=5, interval=0.005, what="the buffered row")
    visible = time.monotonic()
    assert (row["_sync_state"], row["_txn_id"], row["status"], row["metadata"]) == (
        "buffered",
        receipt["txn_id"],
        "running",
        '{"seeing":0.8}',
    )
    assert row["night"] is not None
    print(f"visible {visible - accepted:.3f} s after the 202 ({visible - sent:.3f} s after sending)")

    patch = post("PATCH", f"/v1/records/{TABLE}/{receipt['ids'][0]}", {"status": "completed"})
    row = wait_for(
        lambda: (r := reader.row(TABLE, receipt["ids"][0])) and r["status"] == "completed" and r,
        timeout=5,
        interval=0.005,
        what="the update",
    )
    assert (row["_sync_state"], row["_txn_id"]) == ("buffered", patch["txn_id"])


def test_row_moves_to_replicated_without_disappearing_or_duplicating(
    start_publisher, reader, post, observation, buffer, primary_engine, replica
):
    start_publisher()
    receipt = post("POST", f"/v1/records/{TABLE}", observation())
    key = receipt["ids"][0]
    wait_for(lambda: reader.row(TABLE, key), what="the buffered row")
    seen, watching = [], threading.Event()

    def watch():
        while not watching.is_set():
            seen.append(tuple(r["_sync_state"] for r in reader.rows(TABLE, [key])))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_for(lambda: seen, what="the first observation")
    try:
        assert drain.drain(buffer, primary_engine).applied == 1
        wait_for(lambda: reader.row(TABLE, key)["_sync_state"] == "committed", what="committed")
        confirm_all(buffer, replica)
        wait_for(lambda: reader.row(TABLE, key)["_sync_state"] == "replicated", what="replicated")
        wait_for(lambda: seen[-1] == ("replicated",), what="the watcher seeing it")  # its last look may predate it
    finally:
        watching.set()
        watcher.join()
    assert all(len(states) == 1 for states in seen), "the row vanished or doubled"
    order = ["buffered", "committed", "replicated"]
    states = [order.index(s[0]) for s in seen]
    transitions = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert transitions == [0, 1, 2], transitions
    assert caught_up(replica, reader, TABLE, [key])


def test_rows_written_on_the_primary_by_others_appear_change_and_disappear(start_publisher, reader, migrated, planning, replica):
    start_publisher()
    key = uuid.uuid4()
    with migrated.primary.connect() as conn:  # plain SQL at the main site
        conn.execute(
            "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (%s, %s, %s, '2026-11-21T05:00:00Z')",
            (key, planning["obs_unit"], planning["module"]),
        )
        conn.commit()
        row = wait_for(lambda: reader.row(TABLE, key), what="the inserted row")
        assert (row["_sync_state"], row["night"], row["status"]) == ("replicated", "2026-11-20", "running")
        conn.execute("UPDATE executed_obs_unit SET status = 'aborted' WHERE id = %s", (key,))
        conn.commit()
        wait_for(lambda: reader.row(TABLE, key)["status"] == "aborted", what="the update")
        assert caught_up(replica, reader, TABLE, [key])
        conn.execute("DELETE FROM executed_obs_unit WHERE id = %s", (key,))
        conn.commit()
        wait_for(lambda: reader.row(TABLE, key) is None, what="the delete")


def test_a_late_commit_reaches_the_read_model_exactly_once(start_publisher, reader, migrated, replica):
    start_publisher()
    early, late = uuid.uuid4(), uuid.uuid4()
    with migrated.primary.connect() as a, migrated.primary.connect(autocommit=True) as b:
        a.execute("INSERT INTO instrument (id, name) VALUES (%s, %s)", (late, f"late-{late}"))  # smaller xid, open
        b.execute("INSERT INTO instrument (id, name) VALUES (%s, %s)", (early, f"early-{early}"))  # larger xid, committed
        time.sleep(1)
        assert reader.row("instrument", early) is None, "held back until the smaller xid has ended"
        a.commit()
    wait_for(lambda: len(reader.rows("instrument", [early, late])) == 2, what="both rows")
    assert caught_up(replica, reader, "instrument", [early, late])
    marker = uuid.uuid4()  # changes are published in order: once this one shows, nothing of the two is still to come
    with migrated.primary.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO instrument (id, name) VALUES (%s, %s)", (marker, f"marker-{marker}"))
    wait_for(lambda: reader.row("instrument", marker), what="the marker")
    assert [r["id"] for r in reader.rows("instrument", [early, late])] == sorted([str(early), str(late)])


def test_dead_lettered_rows_are_marked_failed(start_publisher, reader, post, observation, buffer, primary_engine):
    start_publisher()
    receipt = post("POST", f"/v1/records/{TABLE}", observation(obs_unit_id=str(uuid.uuid4())))  # the primary refuses it
    key = receipt["ids"][0]
    wait_for(lambda: reader.row(TABLE, key), what="the buffered row")
    assert drain.drain(buffer, primary_engine).dead_lettered == 1
    row = wait_for(lambda: (r := reader.row(TABLE, key)) and r["_sync_state"] == "failed" and r, what="failed")
    assert row["_txn_id"] == receipt["txn_id"]


def test_catches_up_after_redis_and_replica_outages(
    start_publisher, reader, post, observation, buffer, primary_engine, migrated, own_redis, planning, replica, caplog
):
    """Mid-stream: the replica stops, then Redis stops, both restart; nothing is missed or doubled."""
    caplog.set_level(logging.WARNING, logger="opsync.publisher")
    start_publisher()
    posted = [post("POST", f"/v1/records/{TABLE}", observation())["ids"][0] for _ in range(3)]
    wait_for(lambda: len(reader.rows(TABLE, posted)) == 3, what="the first rows")
    others = []

    def others_insert():
        key = uuid.uuid4()
        with migrated.primary.connect() as conn:
            conn.execute(
                "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (%s, %s, %s, now())",
                (key, planning["obs_unit"], planning["module"]),
            )
        others.append(str(key))

    migrated.replica.stop()
    try:
        others_insert()
        drain.drain(buffer, primary_engine)  # committed while the replica is away
        during = post("POST", f"/v1/records/{TABLE}", observation())["ids"][0]
        posted.append(during)
        assert wait_for(lambda: reader.row(TABLE, during), what="a buffered row while the replica is down")
        own_redis.stop()
        others_insert()
        time.sleep(1.5)
    finally:
        migrated.replica.start()
    migrated.replica.wait_streaming()
    others_insert()
    time.sleep(1.5)
    own_redis.start()
    posted.append(post("POST", f"/v1/records/{TABLE}", observation())["ids"][0])
    drain.drain(buffer, primary_engine)
    confirm_all(buffer, replica)
    ids = posted + others
    wait_for(lambda: caught_up(replica, reader, TABLE, ids), timeout=30, what="catching up")
    assert len(reader.rows(TABLE, ids)) == len(ids) == 8
    assert {r["_sync_state"] for r in reader.rows(TABLE, ids)} == {"replicated"}
    failed = {r.getMessage().split(" failed")[0] for r in caplog.records if " failed: " in r.getMessage()}
    assert {"buffer", "replica changes"} <= failed


def test_metrics_are_appended(start_publisher, reader):
    start_publisher()
    row = wait_for(lambda: reader.query("SELECT * FROM sync_metrics ORDER BY at DESC LIMIT 1"), what="a sample")[0]
    assert row["buffer_depth"] == 0 and row["dead_letters"] == 0 and row["replica_lag_s"] is not None


@pytest.fixture
def datasette(model_path, site_env, own_redis):
    """``datasette serve`` with the plugin directory, the publisher running inside it."""
    ensure_read_model(model_path)
    port = free_port()
    env = {**os.environ, "OPSYNC_READ_MODEL_PATH": str(model_path), "OPSYNC_REDIS_URL": own_redis.url}
    log = open(model_path.parent / "datasette.log", "wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "datasette"),
            "serve",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--plugins-dir",
            str(REPO / "datasette/plugins"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: served(f"{base}/-/versions.json"), timeout=30, interval=0.2, what="datasette")
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_datasette_serves_rows_with_their_sync_state_while_publishing(datasette, post, observation, planning):
    def table(name: str, key) -> list[dict]:
        response = httpx.get(f"{datasette}/opsync/{name}.json", params={"_shape": "array", "id": str(key)}, timeout=5)
        return response.json() if response.status_code == 200 else []

    planned = wait_for(lambda: table("obs_unit", planning["obs_unit"]), what="the full load, served")
    assert planned[0]["_sync_state"] == "replicated" and planned[0]["name"].startswith("orion-")
    receipt = post("POST", f"/v1/records/{TABLE}", observation())
    served_row = wait_for(lambda: table(TABLE, receipt["ids"][0]), timeout=5, what="the buffered row, served")
    assert (served_row[0]["_sync_state"], served_row[0]["_txn_id"]) == ("buffered", receipt["txn_id"])
    names = {t["name"] for t in httpx.get(f"{datasette}/opsync.json", timeout=5).json()["tables"]}
    assert TABLE in names and not names & {"api_token", "sync_ledger", "row_change"}


def test_the_publisher_runs_as_its_own_process(model_path, site_env, own_redis, reader):
    env = {**os.environ, "OPSYNC_READ_MODEL_PATH": str(model_path), "OPSYNC_REDIS_URL": own_redis.url}
    process = subprocess.Popen([sys.executable, "-m", "opsync.read_model.publisher"], env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: model_path.exists() and reader.loaded(), what="the full load")
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and b"full load" in err


def test_a_publisher_behind_the_purge_horizon_resyncs_in_place(start_publisher, reader, model_path, migrated, replica):
    """Changes it never read were purged: it re-reads every row, without emptying the file first."""
    from datetime import timedelta

    from opsync.read_model.changes import purge_changes

    start_publisher()
    kept, gone, added = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with migrated.primary.connect() as conn:
        for key in (kept, gone):
            conn.execute(
                "INSERT INTO obs_unit (id, name, program, source_name, ra_deg, dec_deg) VALUES (%s, %s, 'P9', 'M42', 1, 2)",
                (key, f"resync-{key}"),
            )
        conn.commit()
    wait_for(lambda: len(reader.rows("obs_unit", [kept, gone])) == 2, what="the rows")
    inode = model_path.stat().st_ino
    with sqlite3.connect(model_path) as conn:  # as if the publisher had stopped long ago
        conn.execute("UPDATE publisher_state SET value = '1:-1' WHERE name = 'changes'")
    with migrated.primary.connect() as conn:
        conn.execute("DELETE FROM obs_unit WHERE id = %s", (gone,))
        conn.execute(
            "INSERT INTO obs_unit (id, name, program, source_name, ra_deg, dec_deg) VALUES (%s, %s, 'P9', 'M42', 1, 2)",
            (added, f"resync-{added}"),
        )
        conn.commit()
    time.sleep(0.01)
    engine = create_engine(migrated.primary.url())
    assert purge_changes(engine, timedelta(0)) > 0
    engine.dispose()
    wait_for(lambda: [r["id"] for r in reader.rows("obs_unit", [kept, gone, added])] == sorted([str(kept), str(added)]), what="the resync")
    assert caught_up(replica, reader, "obs_unit", [kept, added])
    assert model_path.stat().st_ino == inode
