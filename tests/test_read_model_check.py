"""The DAG ``opsync_read_model_check``, run with ``dag.test()`` against the real replica, Redis and a read model
filled by the publisher's full load: drift made directly in the SQLite file is found and repaired in place."""

from tests.airflow_home import configure_airflow, migrate

AIRFLOW_HOME = configure_airflow()

import sqlite3  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402
from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from sqlalchemy import text  # noqa: E402

from devstack.settings import REPO  # noqa: E402
from opsync.buffer import Buffer  # noqa: E402
from opsync.config import get_settings  # noqa: E402
from opsync.lsn import current_position, replica_position  # noqa: E402
from opsync.read_model.publisher import Publisher  # noqa: E402
from opsync.read_model.store import ReadModel  # noqa: E402


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=REPO / "dags", safe_mode=False)


@pytest.fixture
def replica(replica_engine):
    return replica_engine


@pytest.fixture
def instruments(primary_engine, replica) -> list[str]:
    """Three rows of our own in the primary, replayed on the replica."""
    keys = [str(uuid.uuid4()) for _ in range(3)]
    with primary_engine.begin() as conn:
        for key in keys:
            conn.execute(text("INSERT INTO instrument (id, name) VALUES (:id, :name)"), {"id": key, "name": f"check-{key}"})
    target = current_position(primary_engine)
    deadline = time.monotonic() + 15
    while replica_position(replica) < target:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.05)
    return keys


@pytest.fixture
def model_path(migrated, own_redis, replica, instruments, tmp_path, monkeypatch):
    """A read model loaded by the publisher, and Airflow's connections and settings pointing at it."""
    path = tmp_path / "opsync.db"
    monkeypatch.setenv("OPSYNC_READ_MODEL_PATH", str(path))
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", own_redis.url)
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_REPLICA", migrated.replica.url(driver="postgresql"))
    get_settings.cache_clear()
    migrate()
    publisher = Publisher(ReadModel(path, get_settings().timezone), Buffer(own_redis.client()), replica)
    publisher.follow_replica()  # the first run: the full load
    publisher.model.close()
    return path


def rows(path, keys) -> dict[str, tuple]:
    with sqlite3.connect(path) as conn:
        marks = ", ".join("?" * len(keys))
        return {r[0]: r[:-1] for r in conn.execute(f"SELECT * FROM instrument WHERE id IN ({marks})", keys)}


def test_a_clean_read_model_has_no_drift(model_path, dagbag, capsys):
    run = dagbag.get_dag("opsync_read_model_check").test()

    assert run.state == "success"
    log = capsys.readouterr().out
    assert "instrument: replica" in log and "no drift" in log and "drift in" not in log
    assert "read model equals the replica" in log


def test_a_deleted_an_altered_and_an_extra_row_are_found_and_repaired(model_path, instruments, dagbag, capsys):
    deleted, altered, kept = instruments
    extra = str(uuid.uuid4())
    before = rows(model_path, instruments)
    inode = model_path.stat().st_ino
    with sqlite3.connect(model_path) as conn:
        conn.execute("DELETE FROM instrument WHERE id = ?", (deleted,))
        conn.execute("UPDATE instrument SET description = 'edited by hand' WHERE id = ?", (altered,))
        conn.execute("INSERT INTO instrument (id, name, active, _sync_state) VALUES (?, 'ghost', 1, 'replicated')", (extra,))

    run = dagbag.get_dag("opsync_read_model_check").test()

    assert run.state == "success"
    log = capsys.readouterr().out
    assert f"1 missing [{deleted}], 1 extra [{extra}], 1 altered [{altered}]; 3 rows repaired" in log
    assert "read model drifted from the replica: 3 rows differed, 3 repaired" in log
    assert rows(model_path, [*instruments, extra]) == before
    assert model_path.stat().st_ino == inode, "repaired in place, never replaced"

    dagbag.get_dag("opsync_read_model_check").test()
    assert "read model equals the replica" in capsys.readouterr().out


def test_a_row_that_cannot_be_published_is_reported_and_left_out_not_a_crash(planning, model_path, primary_engine, replica, dagbag, capsys):
    """JSON nested deeper than Python decodes, written at the main site: the check reads its range by key instead."""
    key = uuid.uuid4()
    with primary_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time, metadata)"
                " VALUES (:id, :obs, :module, now(), CAST(:deep AS jsonb))"
            ),
            {"id": key, "obs": planning["obs_unit"], "module": planning["module"], "deep": "{" + '"a":{' * 3000 + "}" * 3001},
        )
    target = current_position(primary_engine)
    deadline = time.monotonic() + 15
    while replica_position(replica) < target:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.05)
    try:
        run = dagbag.get_dag("opsync_read_model_check").test()

        assert run.state == "success"
        log = capsys.readouterr().out
        assert f"1 rows cannot be published, not compared [{key}]" in log
        assert "read model equals the replica" in log
    finally:
        with primary_engine.begin() as conn:
            conn.execute(text("DELETE FROM executed_obs_unit WHERE id = :id"), {"id": key})
