"""The read model end to end, with every part real: the ingest API over HTTP, the site's Redis buffer,
the drain to the PostgreSQL primary and the confirmation against its streaming replica, and a real
``datasette serve`` started as ``make up`` starts it (:func:`devstack.local.datasette_command`), the
read-model publisher running inside it. Everything is read back through Datasette's JSON API, the way
a script reads it, with the script token.

Each test has a Redis of its own (an empty buffer), a read model file of its own (the publisher's full
load first) and rows tagged by the test's own planned observation, so counts are exact.
"""

import os
import secrets
import subprocess
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select, text

from devstack.local import datasette_command
from devstack.settings import REPO
from opsync import dlq, drain
from opsync.buffer import Buffer
from opsync.read_model.check import ReadModelCheck
from opsync.read_model.store import ReadModel, ensure_read_model, layouts
from tests.conftest import free_port, wait_for

TABLE, FILES = "executed_obs_unit", "raw_data_file"  # files can be deleted through the API, observations not
DB = "opsync"
VISIBLE_WITHIN_S = 5.0  # generous, for a shared machine: the figure (under a second) is bench/read.py's


class Datasette:
    """``datasette serve`` over the test's read model, publisher inside; can be stopped and started again."""

    def __init__(self, model_path, env: dict[str, str], token: str):
        self.model_path, self.env = model_path, env
        self.headers = {"Authorization": f"Bearer {token}"}
        self.process: subprocess.Popen | None = None
        self.base = ""

    def start(self) -> None:
        port = free_port()
        self.log = open(self.model_path.parent / "datasette.log", "ab")
        self.process = subprocess.Popen(
            datasette_command(self.model_path, "127.0.0.1", port),
            env=self.env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{port}"
        wait_for(self.answers, timeout=30, interval=0.2, what=f"datasette (log: {self.log.name})")

    def stop(self) -> None:
        """SIGTERM, as supervisord stops it: the publisher is told to stop and awaited."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None
            self.log.close()

    def answers(self) -> bool:
        assert self.process.poll() is None, f"datasette exited; see {self.log.name}"
        try:
            return httpx.get(f"{self.base}/-/versions.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def rows(self, table: str, **filters) -> list[dict]:
        """Rows of ``table`` matching the exact ``filters``, as Datasette's JSON API serves them."""
        params = {"_shape": "array", "_size": "max", **{k: str(v) for k, v in filters.items()}}
        response = httpx.get(f"{self.base}/{DB}/{table}.json", params=params, headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def row(self, table: str, key) -> dict | None:
        found = self.rows(table, id=key)
        assert len(found) <= 1
        return found[0] if found else None


@pytest.fixture
def buffer(own_redis) -> Buffer:
    return Buffer(own_redis.client())


@pytest.fixture
def replica(replica_engine):
    return replica_engine


@pytest.fixture
def datasette(own_redis, site_env, tmp_path, planning):
    """Datasette with the publisher inside, on this test's file and Redis; yields once the full load is served."""
    token = secrets.token_urlsafe(32)
    model_path = tmp_path / "opsync.db"
    ensure_read_model(model_path)  # as `make up` does: Datasette serves an existing file
    env = {
        **os.environ,  # the test services' OPSYNC_* URLs (site_env, own_redis)
        "OPSYNC_READ_MODEL_PATH": str(model_path),
        "OPSYNC_DATASETTE_TOKEN": token,
        "PYTHONPATH": str(REPO),
    }
    served = Datasette(model_path, env, token)
    served.start()
    try:
        wait_for(lambda: served.row("obs_unit", planning["obs_unit"]), what="the full load, served")
        yield served
    finally:
        served.stop()


@pytest.fixture
def api(live_api, auth_headers):
    """Writes through the ingest API over HTTP; each returns the 202's receipt."""
    headers = auth_headers(TABLE, FILES)

    def send(method: str, path: str, body=None) -> dict:
        response = httpx.request(method, f"{live_api}/v1{path}", json=body, headers=headers, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()

    return send


def replica_view(replica, table: str, key) -> dict | None:
    """The replica's row as the read model must show it once replicated (every column but ``_updated_at``)."""
    layout = layouts("America/Santiago")[table]
    with replica.connect() as conn:
        found = conn.execute(select(layout.entry.table).where(layout.entry.table.c.id == uuid.UUID(str(key)))).first()
    if found is None:
        return None
    return dict(zip(layout.columns[:-1], layout.record(found._mapping, "replicated", None, None, "")[:-1], strict=True))


def served_view(row: dict | None, table: str) -> dict | None:
    return None if row is None else {c: row[c] for c in layouts("UTC")[table].columns[:-1]}


def drain_and_confirm(buffer: Buffer, primary_engine, replica, timeout: float = 15) -> drain.DrainSummary:
    """One drain run as the DAG makes it: apply to the primary, then confirm against the replica's replay."""
    summary = drain.drain(buffer, primary_engine)
    deadline = time.monotonic() + timeout
    while drain.confirm_replica(buffer, replica).remaining:
        assert time.monotonic() < deadline, "transactions still await the replica"
        time.sleep(0.05)
    return summary


def visible(datasette: Datasette, key, check=lambda row: True, what: str = "the row", table: str = TABLE) -> tuple[dict, float]:
    """Polls Datasette until the row shows and passes ``check``; returns it and the seconds it took."""
    started = time.monotonic()
    row = wait_for(lambda: (r := datasette.row(table, key)) and check(r) and r, timeout=2 * VISIBLE_WITHIN_S, interval=0.01, what=what)
    return row, time.monotonic() - started


def gone(datasette: Datasette, key, table: str = TABLE) -> float:
    """Polls Datasette until the row no longer shows; returns the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: datasette.row(table, key) is None, timeout=2 * VISIBLE_WITHIN_S, what=f"the delete of {key}")
    return time.monotonic() - started


def settled(datasette: Datasette, replica, keys, table: str = TABLE) -> bool:
    """Every key shows in Datasette exactly as the replica holds it (absent where the replica has no row)."""
    return all(served_view(datasette.row(table, k), table) == replica_view(replica, table, k) for k in keys)


def file_of(observation: str) -> dict:
    return {
        "path": f"/data/{uuid.uuid4()}/scan.fits",
        "size_bytes": 734_003_200,
        "checksum_sha256": "ab" * 32,
        "file_type": "fits",
        "executed_obs_unit_id": observation,
    }


def no_drift(model_path, buffer: Buffer, replica) -> bool:
    """What the hourly check DAG runs (without repairing): True when every table equals the replica."""
    model = ReadModel(model_path, "America/Santiago")
    try:
        report = ReadModelCheck.open(model, buffer, replica).run(repair=False)
    finally:
        model.close()
    return report.drift == 0 and all(t.unsettled == 0 for t in report.tables)


def test_a_posted_row_is_served_buffered_at_once_then_replicated_equal_to_the_replica(
    datasette, api, observation, buffer, primary_engine, replica
):
    receipt = api("POST", f"/records/{TABLE}", observation(metadata={"seeing_arcsec": 0.8}))
    key = receipt["ids"][0]
    row, seconds = visible(datasette, key, what="the buffered row")
    assert seconds < VISIBLE_WITHIN_S, f"served {seconds:.3f} s after the 202"
    assert (row["_sync_state"], row["_txn_id"], row["metadata"]) == ("buffered", receipt["txn_id"], '{"seeing_arcsec":0.8}')
    assert replica_view(replica, TABLE, key) is None

    assert drain.drain(buffer, primary_engine).applied == 1
    row, _ = visible(datasette, key, lambda r: r["_sync_state"] in ("committed", "replicated"), "committed")
    assert row["_txn_id"] == receipt["txn_id"] or row["_sync_state"] == "replicated"
    drain_and_confirm(buffer, primary_engine, replica)
    row, _ = visible(datasette, key, lambda r: r["_sync_state"] == "replicated", "replicated")

    assert served_view(row, TABLE) == replica_view(replica, TABLE, key)
    assert row["night"] is not None and row["_txn_id"] is None


def test_updates_and_deletes_show_at_once_and_end_as_the_replica_holds_them(datasette, api, observation, buffer, primary_engine, replica):
    obs = api("POST", f"/records/{TABLE}", observation())["ids"][0]
    kept, deleted = (api("POST", f"/records/{FILES}", file_of(obs))["ids"][0] for _ in range(2))
    drain_and_confirm(buffer, primary_engine, replica)
    for table, key in ((TABLE, obs), (FILES, kept), (FILES, deleted)):
        visible(datasette, key, lambda r: r["_sync_state"] == "replicated", "replicated", table)

    # a replicated row updated, a replicated row deleted
    patch = api("PATCH", f"/records/{TABLE}/{obs}", {"status": "completed", "end_time": datetime.now(UTC).isoformat()})
    row, seconds = visible(datasette, obs, lambda r: r["status"] == "completed", "the update")
    assert seconds < VISIBLE_WITHIN_S and (row["_sync_state"], row["_txn_id"]) == ("buffered", patch["txn_id"])
    api("DELETE", f"/records/{FILES}/{deleted}")
    assert gone(datasette, deleted, FILES) < VISIBLE_WITHIN_S
    # a buffered row updated, a buffered row deleted, before any drain
    fresh, doomed = (api("POST", f"/records/{FILES}", file_of(obs))["ids"][0] for _ in range(2))
    visible(datasette, doomed, what="the new file", table=FILES)
    patch = api("PATCH", f"/records/{FILES}/{fresh}", {"file_type": "hdf5"})
    row, seconds = visible(datasette, fresh, lambda r: r["file_type"] == "hdf5", "the update of a buffered row", FILES)
    assert seconds < VISIBLE_WITHIN_S and (row["_sync_state"], row["_txn_id"]) == ("buffered", patch["txn_id"])
    api("DELETE", f"/records/{FILES}/{doomed}")
    assert gone(datasette, doomed, FILES) < VISIBLE_WITHIN_S

    assert drain_and_confirm(buffer, primary_engine, replica).applied == 6
    wait_for(
        lambda: settled(datasette, replica, [obs], TABLE) and settled(datasette, replica, [kept, deleted, fresh, doomed], FILES),
        what="the replica's rows, served",
    )
    assert replica_view(replica, FILES, deleted) is None and replica_view(replica, FILES, doomed) is None
    assert datasette.row(TABLE, obs)["status"] == "completed" and datasette.row(FILES, fresh)["file_type"] == "hdf5"
    assert sorted(r["id"] for r in datasette.rows(FILES, executed_obs_unit_id=obs)) == sorted([kept, fresh])


def test_rows_written_directly_on_the_primary_appear_change_and_go(datasette, migrated, planning, replica):
    key = uuid.uuid4()
    with migrated.primary.connect() as conn:  # plain SQL at the main site, not through opsync
        conn.execute(
            "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time, metadata)"
            " VALUES (%s, %s, %s, '2026-11-21T05:00:00Z', '{\"by\": \"cologne\"}')",
            (key, planning["obs_unit"], planning["module"]),
        )
        conn.commit()
        row, _ = visible(datasette, key, what="the row written on the primary")
        assert (row["_sync_state"], row["night"]) == ("replicated", "2026-11-20")
        assert served_view(row, TABLE) == replica_view(replica, TABLE, key)

        conn.execute("UPDATE executed_obs_unit SET status = 'failed' WHERE id = %s", (key,))
        conn.commit()
        row, _ = visible(datasette, key, lambda r: r["status"] == "failed", "the update on the primary")
        assert served_view(row, TABLE) == replica_view(replica, TABLE, key)

        conn.execute("DELETE FROM executed_obs_unit WHERE id = %s", (key,))
        conn.commit()
    gone(datasette, key)


def test_after_quiescence_the_read_model_equals_the_replica(
    datasette, api, observation, buffer, primary_engine, replica, migrated, planning
):
    keys = [api("POST", f"/records/{TABLE}", observation())["ids"][0] for _ in range(5)]
    files = [api("POST", f"/records/{FILES}", file_of(keys[0]))["ids"][0] for _ in range(2)]
    drain_and_confirm(buffer, primary_engine, replica)
    api("PATCH", f"/records/{TABLE}/{keys[0]}", {"status": "completed"})
    api("DELETE", f"/records/{FILES}/{files[1]}")
    keys.append(api("POST", f"/records/{TABLE}", observation())["ids"][0])
    direct = uuid.uuid4()
    with migrated.primary.connect() as conn:
        conn.execute(
            "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (%s, %s, %s, now())",
            (direct, planning["obs_unit"], planning["module"]),
        )
        conn.execute("UPDATE executed_obs_unit SET status = 'aborted' WHERE id = %s", (keys[2],))
        conn.commit()
    keys.append(str(direct))
    drain_and_confirm(buffer, primary_engine, replica)

    wait_for(
        lambda: settled(datasette, replica, keys) and settled(datasette, replica, files, FILES), what="every row as the replica holds it"
    )
    wait_for(lambda: no_drift(datasette.model_path, buffer, replica), timeout=10, interval=0.5, what="no drift")
    served = datasette.rows(TABLE, obs_unit_id=planning["obs_unit"])
    assert sorted(r["id"] for r in served) == sorted(keys) and {r["_sync_state"] for r in served} == {"replicated"}
    assert [r["id"] for r in datasette.rows(FILES, executed_obs_unit_id=keys[0])] == files[:1]


def test_a_stopped_publisher_catches_up_on_restart_missing_and_doubling_nothing(
    datasette, api, observation, buffer, primary_engine, replica, migrated, planning
):
    """Datasette (and the publisher in it) stops mid-stream; meanwhile records are posted, updated, deleted,
    drained and replicated, and others write on the primary; after the restart every row is served once."""
    before = [api("POST", f"/records/{TABLE}", observation())["ids"][0] for _ in range(3)]
    doomed = api("POST", f"/records/{FILES}", file_of(before[0]))["ids"][0]
    for key in before:
        visible(datasette, key, what="the first rows")
    visible(datasette, doomed, what="the first file", table=FILES)

    datasette.stop()
    during = [api("POST", f"/records/{TABLE}", observation())["ids"][0] for _ in range(3)]
    api("PATCH", f"/records/{TABLE}/{before[0]}", {"status": "completed"})
    api("DELETE", f"/records/{FILES}/{doomed}")
    kept = api("POST", f"/records/{FILES}", file_of(before[1]))["ids"][0]
    drain_and_confirm(buffer, primary_engine, replica)  # these rows reach the replica while nobody publishes
    api("PATCH", f"/records/{TABLE}/{during[0]}", {"status": "aborted"})
    buffered = api("POST", f"/records/{TABLE}", observation())["ids"][0]  # still buffered at the restart
    direct = uuid.uuid4()
    with migrated.primary.connect() as conn:
        conn.execute(
            "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (%s, %s, %s, now())",
            (direct, planning["obs_unit"], planning["module"]),
        )
        conn.commit()
    datasette.start()

    expected = sorted([*before, *during, buffered, str(direct)])
    wait_for(
        lambda: sorted(r["id"] for r in datasette.rows(TABLE, obs_unit_id=planning["obs_unit"])) == expected,
        what="the rows written while the publisher was down",
    )
    row, _ = visible(datasette, during[0], lambda r: r["status"] == "aborted", "the update made while it was down")
    assert row["_sync_state"] == "buffered"
    assert datasette.row(TABLE, buffered)["_sync_state"] == "buffered"
    assert datasette.row(TABLE, before[0])["status"] == "completed"
    assert datasette.row(FILES, doomed) is None and datasette.row(FILES, kept)["_sync_state"] == "replicated"

    drain_and_confirm(buffer, primary_engine, replica)
    everything = [*before, *during, buffered, direct]
    wait_for(
        lambda: settled(datasette, replica, everything) and settled(datasette, replica, [doomed, kept], FILES),
        what="everything replicated, served",
    )
    served = datasette.rows(TABLE, obs_unit_id=planning["obs_unit"])
    assert sorted(r["id"] for r in served) == expected and {r["_sync_state"] for r in served} == {"replicated"}
    wait_for(lambda: no_drift(datasette.model_path, buffer, replica), timeout=10, interval=0.5, what="no drift")


# --- what readers see of failures, through Datasette: drained for real, failing at the real primary --


def test_failed_writes_leave_the_replicas_rows_served_and_a_failed_new_row_shows_failed_until_discarded(
    datasette, api, observation, buffer, primary_engine, replica
):
    obs = api("POST", f"/records/{TABLE}", observation())["ids"][0]
    kept, other = (api("POST", f"/records/{FILES}", file_of(obs))["ids"][0] for _ in range(2))
    drain_and_confirm(buffer, primary_engine, replica)
    wait_for(lambda: settled(datasette, replica, [obs]) and settled(datasette, replica, [kept, other], FILES), what="replicated")
    nowhere = str(uuid.uuid4())  # no such observation: the primary's foreign key refuses what names it

    reused = api("POST", f"/records/{TABLE}", observation(id=obs, status="aborted"))  # the key exists: fails
    api("PATCH", f"/records/{FILES}/{kept}", {"executed_obs_unit_id": nowhere, "file_type": "hdf5"})
    deleting = api(
        "POST", "/transactions", {"steps": [{"op": "delete", "table": FILES, "id": other}, {"table": FILES, "values": file_of(nowhere)}]}
    )
    visible(datasette, obs, lambda r: r["_txn_id"] == reused["txn_id"], "the buffered insert (newest wins)")
    gone(datasette, other, FILES)
    orphan = deleting["ids"][1]
    assert drain.drain(buffer, primary_engine).dead_lettered == 3

    wait_for(
        lambda: settled(datasette, replica, [obs]) and settled(datasette, replica, [kept, other], FILES),
        what="the replica's rows served again, none of the failed values",
    )
    assert datasette.row(TABLE, obs)["status"] == "running" and datasette.row(FILES, kept)["file_type"] == "fits"
    row, _ = visible(datasette, orphan, what="the failed transaction's new row", table=FILES)
    assert (row["_sync_state"], row["_txn_id"]) == ("failed", deleting["txn_id"])

    dlq.discard(buffer, deleting["txn_id"], by="test")
    gone(datasette, orphan, FILES)
    assert datasette.row(FILES, other)["_sync_state"] == "replicated"
    wait_for(lambda: no_drift(datasette.model_path, buffer, replica), timeout=10, interval=0.5, what="no drift")


def test_no_update_brings_back_a_deleted_row_and_a_requeued_insert_shows_replicated(
    datasette, api, live_api, auth_headers, observation, buffer, primary_engine, replica, planning
):
    obs = api("POST", f"/records/{TABLE}", observation())["ids"][0]
    doomed = api("POST", f"/records/{FILES}", file_of(obs))["ids"][0]
    drain_and_confirm(buffer, primary_engine, replica)
    visible(datasette, doomed, lambda r: r["_sync_state"] == "replicated", "replicated", FILES)
    deleted = api("DELETE", f"/records/{FILES}/{doomed}")
    gone(datasette, doomed, FILES)
    headers = auth_headers(FILES)
    update = httpx.patch(f"{live_api}/v1/records/{FILES}/{doomed}", json={"size_bytes": 1}, headers=headers, timeout=10)
    assert update.status_code == 404 and deleted["txn_id"] in update.json()["detail"]
    unknown = httpx.patch(f"{live_api}/v1/records/{FILES}/{uuid.uuid4()}", json={"size_bytes": 1}, headers=headers, timeout=10)
    assert unknown.status_code == 404

    missing = uuid.uuid4()
    orphan = api("POST", f"/records/{FILES}", file_of(str(missing)))
    drain_and_confirm(buffer, primary_engine, replica)
    visible(datasette, orphan["ids"][0], lambda r: r["_sync_state"] == "failed", "the failed new row", FILES)
    assert datasette.row(FILES, doomed) is None
    with primary_engine.begin() as conn:  # the operator fixes the cause, then requeues
        conn.execute(executed_obs_unit_insert(), {"id": missing, "o": planning["obs_unit"], "m": planning["module"]})
    dlq.requeue(buffer, orphan["txn_id"], by="test")
    visible(datasette, orphan["ids"][0], lambda r: r["_sync_state"] == "buffered", "the requeued row", FILES)
    drain_and_confirm(buffer, primary_engine, replica)
    wait_for(lambda: settled(datasette, replica, [doomed, orphan["ids"][0]], FILES), what="the requeued row, replicated")
    assert datasette.row(FILES, orphan["ids"][0])["_sync_state"] == "replicated"


def executed_obs_unit_insert():
    return text(
        "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (:id, :o, :m, '2026-11-21T03:00:00Z')"
    )
