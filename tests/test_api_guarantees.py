"""The ingest API's guarantees against real services (Redis with AOF, PostgreSQL primary + replica):
backpressure, a full Redis, a crashed Redis, Redis down, metrics, the event stream, status retention."""

import os
import signal
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import records
from tests.sse_events import Events

RAW = "/v1/records/raw_data_file"


@pytest.fixture
def headers(auth_headers):
    return auth_headers("raw_data_file", "executed_obs_unit", "instrument")


def raw_file(**overrides) -> dict:
    return records.raw_file(str(uuid.uuid4()), **overrides)


def configure(monkeypatch, **settings) -> None:
    """Change ``OPSYNC_*`` settings of the running app (``get_settings`` is cached)."""
    from opsync.config import get_settings

    for name, value in settings.items():
        monkeypatch.setenv(f"OPSYNC_{name.upper()}", str(value))
    get_settings.cache_clear()


def written(client) -> dict:
    """Everything a write can leave in Redis."""
    return {
        "keys": client.dbsize(),
        "stream": client.xlen("opsync:buffer"),
        "status": sorted(client.scan_iter("opsync:txn:*")) + [(k, client.hlen(k)) for k in sorted(client.scan_iter("opsync:on:*"))],
        "rows": sorted(client.scan_iter("opsync:row:*")),
        "idempotency": sorted(client.scan_iter("opsync:idem:*")),
    }


def drain_everything(client) -> int:
    """What the drainer does once the primary has the data: claim, then acknowledge (never delete)
    and count the acknowledged ones off the buffer's depth, as its settle script does."""
    try:
        client.xgroup_create("opsync:buffer", "drain", id="0")
    except Exception as exc:  # BUSYGROUP: already there
        assert "BUSYGROUP" in str(exc)
    acked = 0
    while batch := client.xreadgroup("drain", "test", {"opsync:buffer": ">"}, count=100):
        ids = [entry_id for _, entries in batch for entry_id, _ in entries]
        if not ids:
            break
        acked += client.xack("opsync:buffer", "drain", *ids)
    client.decrby("opsync:unsent", acked)
    return acked


# --- 1. backpressure ------------------------------------------------------------------------------


def test_backpressure_by_entries_refuses_writes_without_writing_and_recovers(own_redis, api_client, headers, monkeypatch):
    configure(monkeypatch, high_water_entries=3, backpressure_cache_s=0, retry_after_s=17)
    redis = own_redis.client()
    accepted = [api_client.post(RAW, json=raw_file(), headers=headers) for _ in range(3)]
    assert [r.status_code for r in accepted] == [202] * 3
    before = written(redis)

    refused = api_client.post(RAW, json=raw_file(), headers=headers | {"Idempotency-Key": "k1"})
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "17"
    assert "3 unsent transactions (high-water mark 3)" in refused.json()["detail"]
    assert "retry later" in refused.json()["detail"]
    steps = {"steps": [{"table": "raw_data_file", "values": raw_file()}]}
    assert api_client.post("/v1/transactions", json=steps, headers=headers).status_code == 503
    row_id = accepted[0].json()["ids"][0]
    assert api_client.patch(f"{RAW}/{row_id}", json={"size_bytes": 11}, headers=headers).status_code == 503
    assert written(redis) == before, "a refused write changed the buffer"

    ready = api_client.get("/readyz")
    assert ready.status_code == 503 and "high-water mark" in ready.json()["detail"]
    assert "3" not in ready.json()["detail"]  # public: the reason, not the buffer's figures
    # Reads go on: the buffered rows and their states are all still there.
    assert api_client.get(f"{RAW}/{row_id}", headers=headers).json()["_sync_state"] == "buffered"
    assert api_client.get(accepted[0].json()["status_url"], headers=headers).json()["state"] == "accepted"

    assert drain_everything(redis) == 3
    assert api_client.get("/readyz").status_code == 200
    again = api_client.post(RAW, json=raw_file(), headers=headers | {"Idempotency-Key": "k1"})
    assert again.status_code == 202, again.text
    # Nothing was evicted: every accepted entry and status is still in Redis.
    assert redis.xlen("opsync:buffer") == 4
    assert all(api_client.get(r.json()["status_url"], headers=headers).status_code == 200 for r in accepted)
    assert redis.info("stats")["evicted_keys"] == 0


def test_backpressure_by_memory(own_redis, api_client, headers, monkeypatch):
    configure(monkeypatch, backpressure_cache_s=0, high_water_memory_fraction=0.9)
    redis = own_redis.client()
    assert api_client.post(RAW, json=raw_file(), headers=headers).status_code == 202
    used = redis.info("memory")["used_memory"]
    redis.config_set("maxmemory", int(used / 0.95))  # 95 % full: above the 90 % mark, below maxmemory
    try:
        before = written(redis)
        refused = api_client.post(RAW, json=raw_file(), headers=headers)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "30"
        assert "of Redis maxmemory (high-water mark 90%)" in refused.json()["detail"]
        assert written(redis) == before
        assert "high-water mark" in api_client.get("/readyz").json()["detail"]
    finally:
        redis.config_set("maxmemory", 0)
    assert api_client.post(RAW, json=raw_file(), headers=headers).status_code == 202
    assert redis.info("stats")["evicted_keys"] == 0


# --- 2. Redis maxmemory reached -------------------------------------------------------------------


def test_full_redis_answers_a_clear_503_and_writes_nothing(own_redis, api_client, headers, monkeypatch):
    # The backpressure measurement is cached, as in production between two measurements: the write
    # reaches Redis, which refuses it (noeviction).
    configure(monkeypatch, backpressure_cache_s=3600)
    redis = own_redis.client()
    assert api_client.post(RAW, json=raw_file(), headers=headers).status_code == 202
    redis.config_set("maxmemory", redis.info("memory")["used_memory"] // 2)
    try:
        before = written(redis)
        row_id = str(uuid.uuid4())
        request = {"json": raw_file(id=row_id), "headers": headers | {"Idempotency-Key": "full-1"}}
        refused = api_client.post(RAW, **request)
        assert refused.status_code == 503, refused.text
        assert refused.json()["detail"] == "site buffer full (Redis maxmemory reached); retry later"
        assert int(refused.headers["Retry-After"]) > 0
        assert written(redis) == before, "half-written transaction"
        assert api_client.get(f"{RAW}/{row_id}", headers=headers).status_code == 404
        steps = {"steps": [{"table": "raw_data_file", "values": raw_file()}]}
        assert api_client.post("/v1/transactions", json=steps, headers=headers).status_code == 503
        assert written(redis) == before
    finally:
        redis.config_set("maxmemory", 0)
    # No idempotency record was kept for the refused attempt: its retry is a fresh write.
    retried = api_client.post(RAW, **request)
    assert retried.status_code == 202, retried.text
    assert api_client.get(f"{RAW}/{row_id}", headers=headers).json()["_sync_state"] == "buffered"


# --- 3. kill -9 right after a 202 -----------------------------------------------------------------


def test_accepted_transaction_survives_kill_9_of_redis(own_redis, api_client, headers):
    values = raw_file()
    response = api_client.post(RAW, json=values, headers=headers)
    assert response.status_code == 202
    receipt = response.json()
    pid = own_redis.pid
    own_redis.kill()  # SIGKILL: no shutdown, no final fsync; only what was fsynced before the 202 survives
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    own_redis.start()

    from opsync.buffer.codec import decode

    entries = own_redis.client().xrange("opsync:buffer")
    assert [decode(e[b"txn"]).txn_id for _, e in entries] == [uuid.UUID(receipt["txn_id"])]
    status = api_client.get(receipt["status_url"], headers=headers)
    assert status.status_code == 200, status.text
    assert status.json()["state"] == "accepted"
    row = api_client.get(f"{RAW}/{receipt['ids'][0]}", headers=headers).json()
    assert row["_sync_state"] == "buffered" and row["_txn_id"] == receipt["txn_id"]
    assert {k: row[k] for k in values} == values
    # And the API keeps accepting writes on the restarted server.
    assert api_client.post(RAW, json=raw_file(), headers=headers).status_code == 202


# --- 4. Redis down --------------------------------------------------------------------------------


def test_redis_down_is_503_never_500(own_redis, api_client, headers):
    accepted = api_client.post(RAW, json=raw_file(), headers=headers).json()
    own_redis.stop()
    try:
        calls = {
            "post": lambda: api_client.post(RAW, json=raw_file(), headers=headers),
            "transaction": lambda: api_client.post(
                "/v1/transactions", json={"steps": [{"table": "raw_data_file", "values": raw_file()}]}, headers=headers
            ),
            "patch": lambda: api_client.patch(f"{RAW}/{accepted['ids'][0]}", json={"size_bytes": 1}, headers=headers),
            "delete": lambda: api_client.delete(f"{RAW}/{accepted['ids'][0]}", headers=headers),
            "direct": lambda: api_client.post("/v1/records/instrument", json={"name": f"X-{uuid.uuid4().hex[:8]}"}, headers=headers),
            "status": lambda: api_client.get(accepted["status_url"], headers=headers),
            "statuses": lambda: api_client.get("/v1/transactions", params={"ids": accepted["txn_id"]}, headers=headers),
            "row": lambda: api_client.get(f"{RAW}/{accepted['ids'][0]}", headers=headers),
            "rows": lambda: api_client.get(RAW, headers=headers),
        }
        for name, call in calls.items():
            started = time.monotonic()
            response = call()
            assert response.status_code == 503, (name, response.text)
            assert response.json()["detail"].startswith("site buffer unavailable"), (name, response.text)
            assert time.monotonic() - started < 10, f"{name} hung on the dead Redis"
        ready = api_client.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["detail"]
        assert own_redis.password not in ready.text
        assert api_client.get("/healthz").status_code == 200
        metrics = api_client.get("/metrics")
        assert metrics.status_code == 200 and "opsync_buffer_up 0.0" in metrics.text
    finally:
        own_redis.start()
    assert api_client.post(RAW, json=raw_file(), headers=headers).status_code == 202
    assert api_client.get("/readyz").status_code == 200


@pytest.fixture
def short_redis_timeout(monkeypatch):
    """Before the app starts: its workers build their Redis clients at start."""
    configure(monkeypatch, redis_timeout_s=0.5)


def test_a_frozen_redis_is_503_within_the_timeout_and_writes_resume(own_redis, short_redis_timeout, api_client, headers, monkeypatch):
    """Redis that accepts connections but never answers (stopped, not dead): the write is bounded as a
    whole, answered 503, and the connection it left is not reused for the next write's answer."""
    configure(monkeypatch, backpressure_cache_s=3600)
    assert api_client.post(RAW, json=raw_file(), headers=headers).status_code == 202  # verdict measured, connection open
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        frozen = api_client.post(RAW, json=raw_file(), headers=headers)
        took = time.monotonic() - started
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert frozen.status_code == 503, frozen.text
    assert frozen.json()["detail"] == "site buffer unavailable: TimeoutError"
    assert took < 3, f"the write waited {took:.1f} s"
    after = [api_client.post(RAW, json=raw_file(id=str(uuid.uuid4())), headers=headers) for _ in range(3)]
    assert [r.status_code for r in after] == [202] * 3, [r.text for r in after]
    assert len({r.json()["txn_id"] for r in after}) == 3, "a write read another's answer"


# --- 5. metrics -----------------------------------------------------------------------------------


def scrape(api_client) -> dict[tuple[str, tuple], float]:
    response = api_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics(own_redis, api_client, headers):
    from opsync.buffer import Buffer

    buffer = Buffer(own_redis.client())
    empty = scrape(api_client)
    assert empty[("opsync_buffer_up", ())] == 1
    assert empty[("opsync_buffer_depth", ())] == 0
    never = (
        "opsync_buffer_oldest_enqueued_timestamp_seconds",
        "opsync_last_drain_timestamp_seconds",
        "opsync_last_confirm_timestamp_seconds",
        "opsync_drain_last_run_timestamp_seconds",
    )
    assert [name for name in never if (name, ()) in empty] == []  # no such moment: absent, never a -1 sentinel
    before = time.time()

    receipts = [api_client.post(RAW, json=raw_file(), headers=headers).json() for _ in range(2)]
    row_id = receipts[0]["ids"][0]
    assert api_client.get(f"{RAW}/{row_id}", headers=headers).status_code == 200
    time.sleep(0.3)
    figures = scrape(api_client)
    assert figures[("opsync_buffer_depth", ())] == 2
    assert before - 1 <= figures[("opsync_buffer_oldest_enqueued_timestamp_seconds", ())] <= time.time() - 0.3
    assert figures[("opsync_committed_not_replicated", ())] == 0
    assert figures[("opsync_dead_letters", ())] == 0

    def grew(sample) -> float:  # the request metrics are per process: count this test's requests only
        return figures[sample] - empty.get(sample, 0)

    post = (("method", "POST"), ("route", "/v1/records/{table}"), ("status", "202"))
    assert grew(("opsync_http_requests_total", post)) == 2
    get_row = (("method", "GET"), ("route", "/v1/records/{table}/{row_id}"), ("status", "200"))
    assert grew(("opsync_http_requests_total", get_row)) == 1
    count = ("opsync_http_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/records/{table}")))
    assert grew(count) == 2
    assert any(name == "opsync_http_request_duration_seconds_bucket" and ("le", "0.1") in labels for name, labels in figures)
    routes = {dict(labels).get("route") for _, labels in figures}
    assert not any(row_id in str(route) or "raw_data_file" in str(route) for route in routes), routes

    buffer.client.zadd(buffer.awaiting_replica, {receipts[0]["txn_id"]: 1})  # what the drainer does after commit
    buffer.client.xadd(buffer.dead_letters, {"txn": "{}", "reason": "test"})
    drain_everything(own_redis.client())
    after = scrape(api_client)
    assert after[("opsync_committed_not_replicated", ())] == 1
    assert after[("opsync_dead_letters", ())] == 1
    assert after[("opsync_buffer_depth", ())] == 0 and ("opsync_buffer_oldest_enqueued_timestamp_seconds", ()) not in after


# --- 6. the event stream --------------------------------------------------------------------------


@pytest.fixture
def live(live_api, headers, monkeypatch):
    configure(monkeypatch, events_keepalive_s=1)
    with httpx.Client(base_url=live_api, headers=headers, timeout=httpx.Timeout(10)) as client:
        yield client


@pytest.mark.timeout(60)
def test_events_follow_a_transaction_without_polling(own_redis, live, observation, primary_engine):
    """The state change comes from the real drain (its SETTLE script), on a buffer holding only this test's record."""
    from ingest_api.deps import get_buffer
    from opsync import drain

    receipt = live.post("/v1/records/executed_obs_unit", json=observation()).json()
    txn_id = receipt["txn_id"]
    with live.stream("GET", "/v1/events", params={"txn_id": txn_id}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = Events(response)
        assert events.next() == ("ready", {"following": [txn_id]})
        name, snapshot = events.next()
        assert name is None and snapshot["snapshot"] is True
        assert snapshot["txn_id"] == txn_id and snapshot["state"] == "accepted" and "stream_id" not in snapshot
        summary = drain.drain(get_buffer(), primary_engine)
        assert summary.applied == 1
        name, change = events.until(lambda name, data: name is None)
        assert set(change) == {"txn_id", "state", "at", "commit_lsn"}
        assert change["txn_id"] == txn_id and change["state"] == "committed"
        assert change["commit_lsn"] == str(summary.max_commit_lsn)
        assert change["at"] == get_buffer().status(txn_id)["committed_at"]


@pytest.mark.timeout(60)
def test_events_without_filter_show_new_transactions(live):
    with live.stream("GET", "/v1/events") as response:
        events = Events(response)
        assert events.next() == ("ready", {"following": "all"})
        receipt = live.post(RAW, json=raw_file()).json()
        name, event = events.until(lambda name, data: data.get("txn_id") == receipt["txn_id"])
        assert name is None and event["state"] == "accepted" and event["at"] == receipt["accepted_at"]


# --- 7. status retention --------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [None, 4321])
def test_final_status_expires_after_the_retention_others_never(
    own_redis, api_client, headers, observation, primary_engine, replica_engine, monkeypatch, ttl
):
    """Through the real drain and confirmation: SETTLE and CONFIRM (Lua) set the retention, nothing earlier does."""
    from ingest_api import deps
    from opsync import drain

    if ttl is not None:
        configure(monkeypatch, status_ttl_s=ttl)
        deps.get_buffer.cache_clear()
    expected = ttl or 7 * 86400
    buffer = deps.get_buffer()
    redis = own_redis.client()
    receipt = api_client.post("/v1/records/executed_obs_unit", json=observation(), headers=headers).json()
    failed = api_client.post(RAW, json=raw_file(), headers=headers).json()  # its observation does not exist
    (key, slot), failed_key = buffer.travel_key(receipt["txn_id"]), buffer.status_key(failed["txn_id"])
    assert redis.ttl(key) == redis.ttl(buffer.travel_key(failed["txn_id"])[0]) == -1  # accepted: kept however long the link is down

    summary = drain.drain(buffer, primary_engine)
    assert (summary.applied, summary.dead_lettered) == (1, 1)
    assert redis.ttl(key) == -1  # committed: still on its way
    assert expected - 5 <= redis.ttl(failed_key) <= expected
    assert api_client.get(failed["status_url"], headers=headers).json()["state"] == "failed"

    deadline = time.monotonic() + 10
    while drain.confirm_replica(buffer, replica_engine).remaining:
        assert time.monotonic() < deadline, "the replica never replayed the drain's commit"
        time.sleep(0.02)
    assert not redis.hexists(key, slot)  # replicated: moved into its bucket, which expires after the retention
    assert expected - 5 <= redis.ttl(buffer.final_key(receipt["txn_id"])[0]) <= expected
    status = api_client.get(receipt["status_url"], headers=headers).json()
    assert status["state"] == "replicated" and status["commit_lsn"] == str(summary.max_commit_lsn)


def wait_until(condition, what: str, timeout: float = 30):
    """Polls ``condition`` until it holds (a short TTL has passed in Redis); a test cannot hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


def test_a_final_status_is_gone_after_its_ttl_while_older_unfinished_ones_stay(
    own_redis, api_client, headers, observation, primary_engine, replica_engine, monkeypatch
):
    """Each unfinished status here is older than a final one that already expired, so it outlived the TTL."""
    from ingest_api import deps
    from opsync import drain

    configure(monkeypatch, status_ttl_s=1)
    deps.get_buffer.cache_clear()
    buffer = deps.get_buffer()

    def state(receipt: dict) -> str | int:
        response = api_client.get(receipt["status_url"], headers=headers)
        return response.json()["state"] if response.status_code == 200 else response.status_code

    travelling = api_client.post("/v1/records/executed_obs_unit", json=observation(), headers=headers).json()
    failed = api_client.post(RAW, json=raw_file(), headers=headers).json()  # its observation does not exist
    assert (drain.drain(buffer, primary_engine).applied, state(travelling), state(failed)) == (1, "committed", "failed")
    waiting = api_client.post(RAW, json=raw_file(), headers=headers).json()  # never drained here: stays accepted

    wait_until(lambda: state(failed) == 404, "the failed status expiring")
    assert (state(travelling), state(waiting)) == ("committed", "accepted")
    deadline = time.monotonic() + 10
    while drain.confirm_replica(buffer, replica_engine).remaining:
        assert time.monotonic() < deadline, "the replica never replayed the drain's commit"
        time.sleep(0.02)
    assert state(travelling) == "replicated"
    wait_until(lambda: state(travelling) == 404, "the replicated status expiring")
    assert state(waiting) == "accepted" and own_redis.client().ttl(buffer.travel_key(waiting["txn_id"])[0]) == -1


def test_an_idempotency_key_past_its_ttl_makes_a_new_transaction(own_redis, api_client, headers, observation, monkeypatch):
    from ingest_api import deps

    configure(monkeypatch, idempotency_ttl_s=2)
    deps.get_buffer.cache_clear()
    redis, key = own_redis.client(), str(uuid.uuid4())
    request = {"json": observation(), "headers": headers | {"Idempotency-Key": key}}
    first = api_client.post("/v1/records/executed_obs_unit", **request)
    assert first.status_code == 202, first.text
    remembered = redis.keys("opsync:idem:*")  # its bucket, which expires a TTL after its window (an eighth of it)
    assert len(remembered) == 1 and 2000 - 250 < redis.pttl(remembered[0]) <= 2000 + 250
    assert api_client.post("/v1/records/executed_obs_unit", **request).json() == first.json()  # within the TTL: a replay

    wait_until(lambda: not redis.exists(*remembered), "the idempotency record expiring")
    again = api_client.post("/v1/records/executed_obs_unit", **request)
    assert again.status_code == 202 and again.json()["txn_id"] != first.json()["txn_id"]
    other_body = api_client.post("/v1/records/executed_obs_unit", json=observation(status="aborted"), headers=request["headers"])
    assert other_body.status_code == 409  # the new transaction holds the key now
    remembered = redis.keys("opsync:idem:*")
    assert len(remembered) == 1
    wait_until(lambda: not redis.exists(*remembered), "the second idempotency record expiring")
    assert (
        api_client.post("/v1/records/executed_obs_unit", json=observation(status="aborted"), headers=request["headers"]).status_code == 202
    )  # expired: no conflict with the old body
    assert redis.xlen("opsync:buffer") == 3
    assert {api_client.get(r.json()["status_url"], headers=headers).json()["state"] for r in (first, again)} == {"accepted"}
