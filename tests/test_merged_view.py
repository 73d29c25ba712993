"""The merged view: replica rows overlaid with buffered inserts, updates and deletes, newest wins."""

import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from opsync import dlq, drain, merged, registry
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


def test_row_moves_from_buffered_to_replicated_without_disappearing(own_redis, api, observation, planning, primary_engine, replica_engine):
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
    obs = client.post(
        f"/v1/records/{TABLE}",
        json={
            "obs_unit_id": str(planning["obs_unit"]),
            "instrument_module_id": str(planning["module"]),
            "start_time": "2026-11-21T03:00:00Z",
        },
    ).json()["ids"][0]
    file_row = {"executed_obs_unit_id": obs, "size_bytes": 1, "checksum_sha256": SHA, "file_type": "fits"}
    keep, gone = (
        client.post("/v1/records/raw_data_file", json=file_row | {"path": f"/d/{uuid.uuid4()}"}).json()["ids"][0] for _ in range(2)
    )
    assert client.delete(f"/v1/records/raw_data_file/{gone}").status_code == 202
    assert client.get(f"/v1/records/raw_data_file/{gone}").status_code == 404
    rows = client.get("/v1/records/raw_data_file", params={"executed_obs_unit_id": obs}).json()["rows"]
    assert [r["id"] for r in rows] == [keep]


def test_pages_interleave_replica_and_buffer_in_key_order(own_redis, api, observation, planning, primary_engine, replica_engine):
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
            StepIn(
                table="housekeeping_sample",
                values={
                    "instrument_module_id": module,
                    "sensor": sensor,
                    "value": 1.5,
                    "sampled_at": f"2026-11-21T00:00:{i % 60:02d}.{i:06d}Z",
                },
            )
            for i in range(n)
        ]
        txn = build_transaction(steps, "test")
        buffer.enqueue(txn, {"txn_id": str(txn.txn_id)})

    enqueue(100, "lo_power")
    small = query()
    for batch in range(100):
        enqueue(1000, "lo_power" if batch % 2 else "cryostat_temp")
    assert sum(client.zcard(k) for k in client.scan_iter(buffer.index_bucket(buffer.rows_index("housekeeping_sample"), "*"))) == 100_100
    assert query() <= small + 5


# --- what readers see of failures: drained for real, failing at the real primary ------------------


FILES = "raw_data_file"


@pytest.fixture
def writer(ingest_app, issue_token):
    """A client that may read and write observations and files."""
    token = issue_token([f"{verb}:{table}" for verb in ("read", "write") for table in (TABLE, FILES)])
    with TestClient(ingest_app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


def drained(primary_engine, dead_lettered: int) -> None:
    """One real drain run: the primary refuses what it refuses (``dead_lettered`` of them)."""
    from ingest_api.deps import get_buffer

    assert drain.drain(get_buffer(), primary_engine).dead_lettered == dead_lettered


def replica_has(replica_engine, table: str, key) -> bool:
    return bool(merged.replica_rows(replica_engine, registry.get_table(table), {}, ids=[uuid.UUID(str(key))]))


def file_of(obs: str, **values) -> dict:
    return {
        "executed_obs_unit_id": obs,
        "path": f"/d/{uuid.uuid4()}",
        "size_bytes": 1,
        "checksum_sha256": SHA,
        "file_type": "fits",
    } | values


def shown(client, table: str, key) -> dict | None:
    response = client.get(f"/v1/records/{table}/{key}")
    assert response.status_code in (200, 404), response.text
    return response.json() if response.status_code == 200 else None


def test_a_failed_insert_reusing_a_replicated_key_leaves_the_replica_row(
    own_redis, api, observation, planning, primary_engine, replica_engine
):
    key = post(api, observation())
    replicate(primary_engine, replica_engine)
    before = shown(api, TABLE, key)
    reused = api.post(f"/v1/records/{TABLE}", json=observation(id=key, status="aborted", metadata={"by": "mistake"}))
    assert reused.status_code == 202

    drained(primary_engine, 1)

    assert "already exists" in api.get(f"/v1/transactions/{reused.json()['txn_id']}").json()["reason"]
    assert shown(api, TABLE, key) == before and before["status"] == "running" and before["_sync_state"] == "replicated"
    mine = {"obs_unit_id": str(planning["obs_unit"])}
    assert api.get(f"/v1/records/{TABLE}", params=mine | {"status": "aborted"}).json()["rows"] == []
    assert [r["id"] for r in api.get(f"/v1/records/{TABLE}", params=mine | {"status": "running"}).json()["rows"]] == [key]


def test_a_failed_update_or_delete_of_a_replicated_row_leaves_the_replica_row(
    own_redis, writer, observation, planning, primary_engine, replica_engine
):
    obs = post(writer, observation())
    kept = writer.post(f"/v1/records/{FILES}", json=file_of(obs)).json()["ids"][0]
    replicate(primary_engine, replica_engine)
    before = shown(writer, TABLE, obs)
    nowhere = str(uuid.uuid4())  # no such observation: the primary's foreign key refuses both
    patched = writer.patch(f"/v1/records/{TABLE}/{obs}", json={"status": "aborted", "obs_unit_id": nowhere})
    assert patched.status_code == 202 and shown(writer, TABLE, obs)["status"] == "aborted"  # newest wins, while buffered
    deleting = writer.post(
        "/v1/transactions",
        json={
            "steps": [
                {"op": "delete", "table": FILES, "id": kept},
                {"table": FILES, "values": file_of(nowhere)},
            ]
        },
    )
    assert deleting.status_code == 202 and shown(writer, FILES, kept) is None

    drained(primary_engine, 2)

    assert shown(writer, TABLE, obs) == before
    assert (shown(writer, FILES, kept) or {}).get("_sync_state") == "replicated"  # a failed delete hides nothing
    later = writer.patch(f"/v1/records/{TABLE}/{obs}", json={"end_time": "2099-01-01T00:00:00Z"})
    assert later.status_code == 202  # on top of the failed update: shows over the replica row, without its values
    assert shown(writer, TABLE, obs) == before | {
        "end_time": "2099-01-01T00:00:00Z",
        "_sync_state": "buffered",
        "_txn_id": later.json()["txn_id"],
    }


def test_a_valid_insert_under_a_failed_update_converges_to_the_primary(own_redis, api, observation, primary_engine, replica_engine):
    """Insert A and update B (failed) of one row in one drain: once A is replicated the row is A's, never B's."""
    key = post(api, observation())
    assert api.patch(f"/v1/records/{TABLE}/{key}", json={"status": "aborted", "obs_unit_id": str(uuid.uuid4())}).status_code == 202
    drained(primary_engine, 1)
    from ingest_api.deps import get_buffer

    deadline = time.monotonic() + 10
    while drain.confirm_replica(get_buffer(), replica_engine).remaining:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    row = shown(api, TABLE, key)
    assert (row["status"], row["_sync_state"], row["_txn_id"]) == ("running", "replicated", None)


def test_an_update_or_delete_of_a_row_deleted_while_buffered_is_404_and_nothing_brings_it_back(
    own_redis, writer, observation, primary_engine, replica_engine
):
    obs = post(writer, observation())
    replicated, other = (writer.post(f"/v1/records/{FILES}", json=file_of(obs)).json()["ids"][0] for _ in range(2))
    replicate(primary_engine, replica_engine)
    buffered = writer.post(f"/v1/records/{FILES}", json=file_of(obs)).json()["ids"][0]
    for key in (replicated, buffered):
        deleted = writer.delete(f"/v1/records/{FILES}/{key}")
        assert deleted.status_code == 202
        depth = own_redis.client().xlen("opsync:buffer")
        update = {"op": "update", "table": FILES, "id": key, "values": {"size_bytes": 3}}
        for op, refused in (
            ("update", writer.patch(f"/v1/records/{FILES}/{key}", json={"size_bytes": 2})),
            ("delete", writer.delete(f"/v1/records/{FILES}/{key}")),
            ("update", writer.post("/v1/transactions", json={"steps": [update]})),
        ):
            assert refused.status_code == 404, refused.text
            assert refused.json()["detail"] == (
                f"steps.0: no {FILES} row {key} to {op}: deleted by transaction {deleted.json()['txn_id']}, still buffered"
            )
        assert shown(writer, FILES, key) is None and own_redis.client().xlen("opsync:buffer") == depth  # nothing written
    listed = writer.get(f"/v1/records/{FILES}", params={"executed_obs_unit_id": obs}).json()["rows"]
    assert [r["id"] for r in listed] == [other]  # pages hide both deletes too, the replicated row's included
    in_one = writer.post(
        "/v1/transactions",
        json={
            "steps": [
                {"op": "delete", "table": FILES, "id": other},
                {"op": "update", "table": FILES, "id": other, "values": {"size_bytes": 4}},
            ]
        },
    )
    assert in_one.status_code == 422  # decidable from the transaction itself: admission refuses it
    assert in_one.json()["detail"][0]["msg"] == f"{FILES} {other} was deleted by step 0 of this transaction"
    assert shown(writer, FILES, other)["_sync_state"] == "replicated"

    replicate(primary_engine, replica_engine)
    assert [shown(writer, FILES, k) for k in (replicated, buffered)] == [None, None]
    again = writer.patch(f"/v1/records/{FILES}/{replicated}", json={"size_bytes": 5})
    assert again.status_code == 404 and "neither the site buffer nor the local replica" in again.json()["detail"]


def test_an_upsert_after_a_buffered_delete_recreates_the_row(own_redis, writer, observation, primary_engine, replica_engine):
    obs = post(writer, observation())
    key = writer.post(f"/v1/records/{FILES}", json=file_of(obs, size_bytes=7, file_type="hdf5")).json()["ids"][0]
    replicate(primary_engine, replica_engine)
    old = shown(writer, FILES, key)
    assert writer.delete(f"/v1/records/{FILES}/{key}").status_code == 202
    fresh = file_of(obs, size_bytes=8)
    upsert = writer.post("/v1/transactions", json={"steps": [{"op": "upsert", "table": FILES, "id": key, "values": fresh}]})
    assert upsert.status_code == 202
    row = shown(writer, FILES, key)
    assert (row["size_bytes"], row["file_type"], row["_sync_state"]) == (8, "fits", "buffered")
    assert row.get("created_at") != old["created_at"]  # a new row: nothing of the deleted one shows
    replicate(primary_engine, replica_engine)
    row = shown(writer, FILES, key)
    assert (row["size_bytes"], row["file_type"], row["path"], row["_sync_state"]) == (8, "fits", fresh["path"], "replicated")
    assert row["created_at"] != old["created_at"]


def test_an_update_or_delete_of_a_key_nobody_has_is_404_and_writes_nothing(own_redis, writer, observation, replica_engine):
    nobody = str(new_id())
    depth = own_redis.client().xlen("opsync:buffer")
    for refused in (
        writer.patch(f"/v1/records/{TABLE}/{nobody}", json={"status": "aborted"}),
        writer.delete(f"/v1/records/{FILES}/{nobody}"),
        writer.post(
            "/v1/transactions",
            json={
                "steps": [
                    {"table": TABLE, "values": observation()},
                    {"op": "update", "table": TABLE, "id": nobody, "values": {"status": "aborted"}},
                ]
            },
        ),
    ):
        assert refused.status_code == 404, refused.text
        assert nobody in refused.json()["detail"] and "neither the site buffer nor the local replica" in refused.json()["detail"]
    assert own_redis.client().xlen("opsync:buffer") == depth
    assert shown(writer, TABLE, nobody) is None and not replica_has(replica_engine, TABLE, nobody)
    created = writer.post(
        "/v1/transactions",
        json={
            "steps": [  # a row an earlier step creates is known
                {"table": TABLE, "ref": "o", "id": nobody, "values": observation()},
                {"op": "update", "table": TABLE, "id": nobody, "values": {"status": "completed"}},
            ]
        },
    )
    assert created.status_code == 202 and shown(writer, TABLE, nobody)["status"] == "completed"


def test_an_unknown_key_with_the_replica_down_is_503_and_writes_nothing(own_redis, writer, observation, migrated):
    nobody, buffered_row = str(new_id()), post(writer, observation())  # the token is checked (and cached) now
    migrated.replica.stop("fast")
    try:
        refused = writer.patch(f"/v1/records/{TABLE}/{nobody}", json={"status": "aborted"})
        assert writer.patch(f"/v1/records/{TABLE}/{buffered_row}", json={"status": "aborted"}).status_code == 202
    finally:
        migrated.replica.start()
    assert refused.status_code == 503 and "local replica unavailable" in refused.json()["detail"]
    assert refused.headers["Retry-After"]
    assert own_redis.client().xlen("opsync:buffer") == 2


def test_a_failed_new_insert_shows_failed_until_discarded(own_redis, writer, observation, primary_engine):
    from ingest_api.deps import get_buffer

    orphan = writer.post(f"/v1/records/{FILES}", json=file_of(str(uuid.uuid4())))
    key, txn_id = orphan.json()["ids"][0], orphan.json()["txn_id"]
    drained(primary_engine, 1)
    row = shown(writer, FILES, key)
    assert (row["_sync_state"], row["_txn_id"]) == ("failed", txn_id)
    listing = {"executed_obs_unit_id": row["executed_obs_unit_id"]}
    assert [r["id"] for r in writer.get(f"/v1/records/{FILES}", params=listing).json()["rows"]] == [key]

    assert dlq.discard(get_buffer(), txn_id, by="test").changed
    assert shown(writer, FILES, key) is None
    assert writer.get(f"/v1/records/{FILES}", params=listing).json()["rows"] == []
    assert writer.patch(f"/v1/records/{FILES}/{key}", json={"size_bytes": 2}).status_code == 404


def test_a_requeued_insert_that_succeeds_shows_replicated(own_redis, writer, planning, primary_engine, replica_engine):
    from ingest_api.deps import get_buffer

    missing = uuid.uuid4()
    orphan = writer.post(f"/v1/records/{FILES}", json=file_of(str(missing)))
    key, txn_id = orphan.json()["ids"][0], orphan.json()["txn_id"]
    drained(primary_engine, 1)
    assert writer.patch(f"/v1/records/{FILES}/{key}", json={"size_bytes": 2}).status_code == 404  # a row only a failure wrote
    with primary_engine.begin() as conn:  # the operator fixes the cause
        conn.execute(
            text(
                "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time)"
                " VALUES (:id, :o, :m, '2026-11-21T03:00:00Z')"
            ),
            {"id": missing, "o": planning["obs_unit"], "m": planning["module"]},
        )
    assert [a.changed for a in dlq.requeue(get_buffer(), txn_id, by="test")] == [True]
    assert shown(writer, FILES, key)["_sync_state"] == "buffered"

    replicate(primary_engine, replica_engine)

    row = shown(writer, FILES, key)
    assert (row["_sync_state"], row["_txn_id"], row["executed_obs_unit_id"]) == ("replicated", None, str(missing))


def test_updates_racing_a_delete_are_either_before_it_or_refused(own_redis, live_api, auth_headers, observation):
    """The check is inside the enqueue script: no update is buffered after the delete, whatever the timing."""
    import threading

    import httpx

    from ingest_api.deps import get_buffer

    headers = auth_headers(TABLE, FILES)
    with httpx.Client(base_url=f"{live_api}/v1", headers=headers, timeout=10) as client:
        obs = client.post(f"/records/{TABLE}", json=observation()).json()["ids"][0]
        key = client.post(f"/records/{FILES}", json=file_of(obs)).json()["ids"][0]
    answers: list[httpx.Response] = []

    def patch_often() -> None:
        with httpx.Client(base_url=f"{live_api}/v1", headers=headers, timeout=10) as client:
            answers.extend(client.patch(f"/records/{FILES}/{key}", json={"size_bytes": n}) for n in range(2, 30))

    threads = [threading.Thread(target=patch_often) for _ in range(3)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=f"{live_api}/v1", headers=headers, timeout=10) as client:
        time.sleep(0.05)
        deleted = client.delete(f"/records/{FILES}/{key}").json()
        for thread in threads:
            thread.join()
        last = client.patch(f"/records/{FILES}/{key}", json={"size_bytes": 1})
    assert last.status_code == 404 and deleted["txn_id"] in last.json()["detail"]
    assert {a.status_code for a in answers} <= {202, 404}
    buffer = get_buffer()
    at = drain.stream_order(buffer.status(deleted["txn_id"])["stream_id"])
    accepted = [a.json()["txn_id"] for a in answers if a.status_code == 202]
    assert all(drain.stream_order(s["stream_id"]) < at for s in buffer.statuses(accepted))
    assert all(deleted["txn_id"] in a.json()["detail"] for a in answers if a.status_code == 404)
    with httpx.Client(base_url=f"{live_api}/v1", headers=headers, timeout=10) as client:
        assert client.get(f"/records/{FILES}/{key}").status_code == 404
