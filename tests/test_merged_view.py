"""The merged view: replica rows overlaid with buffered inserts, updates and deletes, newest wins."""

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from opsync import drain, merged, registry
from opsync.buffer import Buffer
from opsync.ids import new_id
from opsync.ingest import StepIn, build_transaction

SHA = "cd" * 32
TABLE = "executed_obs_unit"


@pytest.fixture
def api(ingest_app, issue_token):
    token = issue_token([f"{verb}:{TABLE}" for verb in ("read", "write")])
    with TestClient(ingest_app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


def post(api, values) -> str:
    response = api.post(f"/v1/records/{TABLE}", json=values)
    assert response.status_code == 202, response.text
    return response.json()["ids"][0]


def replicate(primary_engine, replica_engine) -> None:
    """Everything buffered goes the real way: the drain (claim, apply, SETTLE), then CONFIRM once the replica passed it.

    Tests that call it take ``own_redis`` first, so the buffer holds only their own records.
    """
    from ingest_api.deps import get_buffer

    buffer = get_buffer()
    assert drain.drain(buffer, primary_engine).dead_lettered == 0
    deadline = time.monotonic() + 10
    while drain.confirm_replica(buffer, replica_engine).remaining:
        assert time.monotonic() < deadline, "the replica never replayed the drain's commit"
        time.sleep(0.02)


def test_buffered_insert_and_update_show_at_once(api, observation):
    row_id = post(api, observation())
    row = api.get(f"/v1/records/{TABLE}/{row_id}").json()
    assert row["status"] == "running" and row["_sync_state"] == "buffered"
    patched = api.patch(f"/v1/records/{TABLE}/{row_id}", json={"status": "completed", "end_time": "2099-01-01T00:00:00Z"})
    assert patched.status_code == 202, patched.text
    row = api.get(f"/v1/records/{TABLE}/{row_id}").json()
    assert row["status"] == "completed" and row["end_time"] == "2099-01-01T00:00:00Z"
    assert row["_txn_id"] == patched.json()["txn_id"]


def test_row_moves_from_buffered_to_replicated_without_disappearing(
    own_redis, api, observation, planning, primary_engine, replica_engine
):
    response = api.post(f"/v1/records/{TABLE}", json=observation())
    row_id, txn_id = response.json()["ids"][0], response.json()["txn_id"]
    listing = {"obs_unit_id": str(planning["obs_unit"])}
    assert [r["id"] for r in api.get(f"/v1/records/{TABLE}", params=listing).json()["rows"]] == [row_id]
    replicate(primary_engine, replica_engine)
    rows = api.get(f"/v1/records/{TABLE}", params=listing).json()["rows"]
    assert [(r["id"], r["_sync_state"]) for r in rows] == [(row_id, "replicated")]
    assert api.get(f"/v1/transactions/{txn_id}").json()["state"] == "replicated"
    assert not own_redis.client().exists(Buffer(own_redis.client()).row_key(TABLE, row_id))


def test_update_of_a_replicated_row_overlays_and_moves_it_between_filters(
    own_redis, api, observation, planning, primary_engine, replica_engine
):
    row_id = post(api, observation())
    replicate(primary_engine, replica_engine)
    api.patch(f"/v1/records/{TABLE}/{row_id}", json={"status": "aborted"})
    row = api.get(f"/v1/records/{TABLE}/{row_id}").json()
    assert row["status"] == "aborted" and row["_sync_state"] == "buffered"
    assert row["obs_unit_id"] == str(planning["obs_unit"])  # the rest comes from the replica
    mine = {"obs_unit_id": str(planning["obs_unit"])}
    assert [r["id"] for r in api.get(f"/v1/records/{TABLE}", params=mine | {"status": "aborted"}).json()["rows"]] == [row_id]
    assert api.get(f"/v1/records/{TABLE}", params=mine | {"status": "running"}).json()["rows"] == []


def test_deletes_hide_rows(api, ingest_app, issue_token, planning):
    token = issue_token(["read:raw_data_file", "write:raw_data_file", f"write:{TABLE}"])
    client = TestClient(ingest_app, headers={"Authorization": f"Bearer {token}"})
    obs = client.post(f"/v1/records/{TABLE}", json={
        "obs_unit_id": str(planning["obs_unit"]), "instrument_module_id": str(planning["module"]),
        "start_time": "2026-11-21T03:00:00Z"}).json()["ids"][0]
    file_row = {"executed_obs_unit_id": obs, "size_bytes": 1, "checksum_sha256": SHA, "file_type": "fits"}
    keep, gone = (
        client.post("/v1/records/raw_data_file", json=file_row | {"path": f"/d/{uuid.uuid4()}"}).json()["ids"][0]
        for _ in range(2)
    )
    assert client.delete(f"/v1/records/raw_data_file/{gone}").status_code == 202
    assert client.get(f"/v1/records/raw_data_file/{gone}").status_code == 404
    rows = client.get("/v1/records/raw_data_file", params={"executed_obs_unit_id": obs}).json()["rows"]
    assert [r["id"] for r in rows] == [keep]


def test_pages_interleave_replica_and_buffer_in_key_order(
    own_redis, api, observation, planning, primary_engine, replica_engine
):
    expected = [str(new_id()) for _ in range(7)]  # time-ordered: key order is this order
    for key in expected[::2]:
        post(api, observation(id=key))
    replicate(primary_engine, replica_engine)
    for key in expected[1::2]:
        post(api, observation(id=key))
    seen, cursor = [], None
    while True:
        params = {"obs_unit_id": str(planning["obs_unit"]), "limit": 3} | ({"after": cursor} if cursor else {})
        page = api.get(f"/v1/records/{TABLE}", params=params).json()
        seen += [(r["id"], r["_sync_state"]) for r in page["rows"]]
        if not (cursor := page["next"]):
            break
    assert seen == [(key, "buffered" if i % 2 else "replicated") for i, key in enumerate(expected)]


def test_filters_are_checked(api):
    assert api.get(f"/v1/records/{TABLE}", params={"start_time": "x"}).status_code == 400
    bad = api.get(f"/v1/records/{TABLE}", params={"status": "exploded"})
    assert bad.status_code == 400 and "status" in bad.json()["detail"]
    assert api.get("/v1/records/nope").status_code == 404
    assert api.get(f"/v1/records/{TABLE}/{uuid.uuid4()}").status_code == 404


def test_reads_need_the_read_scope(ingest_app, issue_token):
    token = issue_token([f"write:{TABLE}"])
    client = TestClient(ingest_app, headers={"Authorization": f"Bearer {token}"})
    assert client.get(f"/v1/records/{TABLE}").status_code == 403


def test_many_transactions_states_at_once(api, observation):
    txn_ids = [api.post(f"/v1/records/{TABLE}", json=observation()).json()["txn_id"] for _ in range(3)]
    unknown = str(uuid.uuid4())
    states = api.get("/v1/transactions", params=[("ids", ",".join(txn_ids[:2] + [unknown])), ("ids", txn_ids[2])])
    assert states.status_code == 200
    assert {k: (v or {}).get("state") for k, v in states.json().items()} == {**dict.fromkeys(txn_ids, "accepted"), unknown: None}
    assert api.get("/v1/transactions", params={"ids": "not-a-uuid"}).status_code == 422


def test_queries_cost_the_same_with_100k_buffered_rows(redis_server, planning, replica_engine):
    """No scan of the buffer: the Redis commands a query makes do not grow with the buffer."""
    client = redis_server.client()
    buffer = Buffer(client, prefix=f"big-{uuid.uuid4().hex[:6]}")
    entry = registry.get_table("housekeeping_sample")
    module = str(planning["module"])

    def calls() -> int:
        return sum(v["calls"] for v in client.info("commandstats").values())

    def query() -> int:
        before = calls()
        rows, _ = merged.list_rows(buffer, replica_engine, entry, {"instrument_module_id": module, "sensor": "lo_power"}, None, 50)
        assert len(rows) == 50 and all(r["sensor"] == "lo_power" for r in rows)
        return calls() - before

    def enqueue(n: int, sensor: str) -> None:
        steps = [
            StepIn(table="housekeeping_sample", values={
                "instrument_module_id": module, "sensor": sensor, "value": 1.5,
                "sampled_at": f"2026-11-21T00:00:{i % 60:02d}.{i:06d}Z"})
            for i in range(n)
        ]
        txn = build_transaction(steps, "test")
        buffer.enqueue(txn, {"txn_id": str(txn.txn_id)})

    enqueue(100, "lo_power")
    small = query()
    for batch in range(100):
        enqueue(1000, "lo_power" if batch % 2 else "cryostat_temp")
    assert client.zcard(buffer.rows_index("housekeeping_sample")) == 100_100
    assert query() <= small + 5
