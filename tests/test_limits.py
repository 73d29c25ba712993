"""Bounded work per request and per script call: the size limits of writes, and the drainer's chunked settle.

A write above a limit is ``413`` naming the limit, before anything reaches the site buffer; one at
the limit is accepted. The drainer settles a batch in several bounded script calls; a crash between
them redelivers the rest, which the ledger skips, so nothing is lost, applied twice or
dead-lettered twice. Real Redis and PostgreSQL, as everywhere; the timings are ``make bench-scripts``.
"""

import json
import uuid

import pytest
from sqlalchemy import text

from opsync import drain
from opsync.buffer import Buffer, Settlement, settle_chunks
from opsync.buffer import stream as buffer_module
from opsync.buffer.figures import buffer_stats
from opsync.ingest import StepIn, build_transaction
from tests import test_dlq

HK = "/v1/records/housekeeping_sample"
SHA = "ab" * 32


@pytest.fixture
def writes(redis_server):
    """What a write would change: the number of keys and the stream's length."""
    client = redis_server.client()
    yield lambda: (client.dbsize(), client.xlen("opsync:buffer"))
    client.close()


@pytest.fixture
def headers(auth_headers):
    return auth_headers("housekeeping_sample")


def samples(planning, n: int) -> list[dict]:
    module = str(planning["module"])
    return [
        {"instrument_module_id": module, "sensor": f"s{uuid.uuid4().hex[:8]}", "sampled_at": "2026-11-21T03:00:00Z", "value": 4.2}
        for _ in range(n)
    ]


def steps_of(rows: list[dict]) -> dict:
    return {"steps": [{"table": "housekeeping_sample", "values": row} for row in rows]}


def assert_too_large(response, limit: int, setting: str, what: str) -> None:
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert f"at most {limit} {what}" in detail and setting in detail, detail


def test_a_transaction_with_more_steps_than_the_limit_is_413_and_writes_nothing(api_client, headers, writes, planning, site_env):
    limit = site_env.max_steps_per_transaction
    before = writes()
    response = api_client.post("/v1/transactions", json=steps_of(samples(planning, limit + 1)), headers=headers)
    assert_too_large(response, limit, "OPSYNC_MAX_STEPS_PER_TRANSACTION", "steps per transaction")
    assert writes() == before


def test_a_transaction_at_the_step_limit_is_accepted(api_client, headers, planning, site_env):
    limit = site_env.max_steps_per_transaction
    response = api_client.post("/v1/transactions", json=steps_of(samples(planning, limit)), headers=headers)
    assert response.status_code == 202, response.text
    assert len(response.json()["ids"]) == limit


def test_a_list_with_more_records_than_the_limit_is_413_and_writes_nothing(api_client, headers, writes, planning, site_env):
    limit = site_env.max_records_per_request
    before = writes()
    response = api_client.post(HK, json=samples(planning, limit + 1), headers=headers)
    assert_too_large(response, limit, "OPSYNC_MAX_RECORDS_PER_REQUEST", "records per request")
    assert writes() == before


def test_a_list_at_the_record_limit_is_accepted(api_client, headers, planning, site_env):
    response = api_client.post(HK, json=samples(planning, site_env.max_records_per_request), headers=headers)
    assert response.status_code == 202, response.text


def test_a_list_within_the_record_limit_is_still_bound_by_the_step_limit(api_client, headers, writes, planning, site_env, monkeypatch):
    """A list is one transaction of a step per record: a site that raises the record limit alone gets the step limit."""
    from opsync.config import get_settings

    monkeypatch.setenv("OPSYNC_MAX_RECORDS_PER_REQUEST", "10")
    monkeypatch.setenv("OPSYNC_MAX_STEPS_PER_TRANSACTION", "5")
    get_settings.cache_clear()
    before = writes()
    response = api_client.post(HK, json=samples(planning, 6), headers=headers)
    assert_too_large(response, 5, "OPSYNC_MAX_STEPS_PER_TRANSACTION", "steps per transaction")
    assert writes() == before


def observation_body(observation, size: int) -> bytes:
    """An executed observation's JSON of exactly ``size`` bytes (its metadata padded)."""
    empty = json.dumps(observation(metadata={"pad": ""})).encode()
    return json.dumps(observation(metadata={"pad": "x" * (size - len(empty))})).encode()


def test_a_body_larger_than_the_limit_is_413_naming_it_and_one_at_the_limit_is_accepted(
    api_client, auth_headers, observation, writes, site_env
):
    headers = auth_headers("executed_obs_unit") | {"Content-Type": "application/json"}
    limit = site_env.max_body_bytes
    before = writes()
    response = api_client.post("/v1/records/executed_obs_unit", content=observation_body(observation, limit + 1), headers=headers)
    assert response.status_code == 413 and "OPSYNC_MAX_BODY_BYTES" in response.json()["detail"], response.text
    assert writes() == before
    at_limit = observation_body(observation, limit)
    assert len(at_limit) == limit
    assert api_client.post("/v1/records/executed_obs_unit", content=at_limit, headers=headers).status_code == 202


def test_the_defaults_keep_a_list_within_the_step_limit(site_env):
    assert site_env.max_records_per_request <= site_env.max_steps_per_transaction


# --- the drainer's settle, in chunks ------------------------------------------------------------------


def settlement(outcome: str = "committed", rows: int = 0) -> Settlement:
    return Settlement(outcome, f"{uuid.uuid4().int % 10**9}-0", str(uuid.uuid4()), rows=tuple(f"t:{i}" for i in range(rows)))


def test_settle_chunks_keep_the_order_and_bound_entries_rows_and_failures():
    batch = [settlement() for _ in range(600)] + [settlement("failed", 800) for _ in range(3)] + [settlement("failed")] * 5
    chunks = list(settle_chunks(batch))

    assert [s for chunk in chunks for s in chunk] == batch
    for chunk in chunks:
        assert len(chunk) <= buffer_module.SETTLE_ENTRIES
        assert sum(s.outcome == "failed" for s in chunk) <= buffer_module.SETTLE_FAILED
        assert len(chunk) == 1 or sum(len(s.rows) for s in chunk) <= buffer_module.SETTLE_ROWS
    entries = buffer_module.SETTLE_ENTRIES  # 600 committed ones, then the failed: entries, rows, then failures close a chunk
    assert [len(c) for c in chunks] == [entries] * (600 // entries) + [600 % entries + 1, 1, 2, 2, 2]


def test_an_entry_larger_than_a_chunk_is_settled_alone():
    huge = settlement("failed", buffer_module.SETTLE_ROWS + 1)
    first, last = settlement(), settlement()
    assert list(settle_chunks([first, huge, last])) == [[first], [huge], [last]]


buffer, primary = test_dlq.buffer, test_dlq.primary  # a buffer of its own prefix; the primary as the drainer's


def observation_step(planning, **values) -> StepIn:
    return StepIn(
        table="executed_obs_unit",
        values={
            "obs_unit_id": str(planning["obs_unit"]),
            "instrument_module_id": str(planning["module"]),
            "start_time": "2026-11-21T03:00:00Z",
        }
        | values,
    )


def raw_file(obs_key) -> StepIn:
    return StepIn(
        table="raw_data_file",
        values={
            "executed_obs_unit_id": str(obs_key),
            "path": f"/data/{uuid.uuid4()}.fits",
            "size_bytes": 10,
            "checksum_sha256": SHA,
            "file_type": "fits",
        },
    )


def buffered(buffer: Buffer, step: StepIn):
    txn = build_transaction([step], "test")
    buffer.enqueue(txn, {"txn_id": str(txn.txn_id)})
    return txn


def count(primary, table: str, keys) -> int:
    with primary.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table} WHERE id = ANY(:k)"), {"k": [str(k) for k in keys]}).scalar()


def ledger(primary, txns) -> int:
    with primary.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM sync_ledger WHERE txn_id = ANY(:t)"), {"t": [str(t.txn_id) for t in txns]}).scalar()


@pytest.mark.parametrize("crash_at_call", [2, 3])
def test_a_crash_between_settle_chunks_redelivers_the_rest_exactly_once(buffer, primary, planning, monkeypatch, crash_at_call):
    """Chunks of two entries: [good, good] [bad, dependant of bad] [good]; the drainer dies before call 2 or 3."""
    good = [buffered(buffer, observation_step(planning)) for _ in range(2)]
    bad = buffered(buffer, observation_step(planning, obs_unit_id=str(uuid.uuid4())))  # no such planned observation
    dependant = buffered(buffer, raw_file(bad.steps[0].key))
    last = buffered(buffer, observation_step(planning))
    monkeypatch.setattr(buffer_module, "SETTLE_ENTRIES", 2)
    settle, calls = buffer._settle, []

    def dies_at_a_call(**kwargs):
        calls.append(kwargs)
        if len(calls) == crash_at_call:
            raise RuntimeError("drainer killed between two settle calls")
        return settle(**kwargs)

    monkeypatch.setattr(buffer, "_settle", dies_at_a_call)
    with pytest.raises(RuntimeError):
        drain.drain(buffer, primary)
    settled = 2 * (crash_at_call - 1)
    order = [*good, bad, dependant, last]
    states = [s["state"] for s in buffer.statuses([t.txn_id for t in order])]
    assert states == (["committed", "committed", "failed", "failed", "accepted"][:settled] + ["accepted"] * (5 - settled))
    assert buffer_stats(buffer.client, buffer).pending == 5 - settled  # claimed, not acknowledged: redelivered

    monkeypatch.setattr(buffer, "_settle", settle)
    summary = drain.drain(buffer, primary)

    assert (summary.applied, summary.duplicates) == (0, 1)  # the last one: committed before the crash, skipped now
    applied = [*good, last]
    assert count(primary, "executed_obs_unit", [t.steps[0].key for t in applied]) == 3
    assert ledger(primary, applied) == 3 and ledger(primary, [bad, dependant]) == 0
    dead = [f[b"txn_id"].decode() for _, f in buffer.client.xrange(buffer.dead_letters)]
    assert dead == [str(bad.txn_id), str(dependant.txn_id)]  # each dead-lettered once, in stream order
    assert buffer.status(dependant.txn_id)["reason"] == f"depends on dead-lettered transaction {bad.txn_id}"
    assert [s["state"] for s in buffer.statuses([t.txn_id for t in order])] == ["committed"] * 2 + ["failed"] * 2 + ["committed"]
    stats = buffer_stats(buffer.client, buffer)
    assert (stats.depth, stats.pending, stats.dead_letters) == (0, 0, 2)
    assert buffer.client.zcard(buffer.awaiting_replica) == 3


def test_a_claim_reads_in_pages_pending_entries_first_then_new_ones_in_stream_order(buffer, planning, monkeypatch):
    """Each read returns at most CLAIM_PAGE entries (one reply of many large envelopes would hold Redis)."""
    monkeypatch.setattr(buffer_module, "CLAIM_PAGE", 2)
    txns = [buffered(buffer, observation_step(planning)) for _ in range(5)]
    buffer.ensure_group()
    reads = []
    xreadgroup = buffer.client.xreadgroup
    monkeypatch.setattr(buffer.client, "xreadgroup", lambda *a, **k: reads.append(k["count"]) or xreadgroup(*a, **k))
    ids = lambda entries: [e.stream_id for e in entries]  # noqa: E731
    stream_ids = [buffer.status(t.txn_id)["stream_id"] for t in txns]

    assert ids(buffer.claim("c", 3)) == stream_ids[:3]  # claimed, not acknowledged: pending
    later = [buffer.status(buffered(buffer, observation_step(planning)).txn_id)["stream_id"] for _ in range(2)]
    assert ids(buffer.claim("c", 10)) == stream_ids + later  # the 3 pending first, then the 4 new ones
    assert max(reads) <= 2
