"""Sizing from the measured bytes per transaction: finished transactions kept for their TTL count, so a
second outage soon after the first one is refused where the arithmetic says, not later and not sooner."""

import uuid

import redis

from devstack.redis import RedisServer
from opsync import drain, sizing
from opsync.buffer import IDEMPOTENCY_BUCKETS, IDEMPOTENCY_WINDOWS, Settlement
from opsync.buffer.codec import decode
from opsync.buffer.figures import Fill
from opsync.config import Settings
from opsync.envelope import State
from opsync.ingest import StepIn, answer, build_transaction
from opsync.lsn import Lsn

HK = "/v1/records/housekeeping_sample"
KEPT = 3000  # finished transactions of an earlier outage, kept for the status TTL
ROOM = 800  # transactions the test leaves room for
PEAK_TXNS_PER_S = 21  # the README's peak


def sample() -> dict:
    return {"instrument_module_id": str(uuid.uuid4()), "sensor": "mixer", "sampled_at": "2026-11-21T02:00:00Z", "value": 4.2, "unit": "K"}


def test_the_default_maxmemory_holds_a_second_full_outage_while_the_first_ones_records_are_kept():
    settings = Settings()
    entries = settings.high_water_entries
    needed = sizing.maxmemory_for(entries, kept=entries, memory_fraction=settings.high_water_memory_fraction)
    assert needed <= int(RedisServer.maxmemory.removesuffix("gb")) * 1024**3


def test_the_default_entries_mark_leaves_room_for_a_whole_48_hour_outage_at_the_peak():
    """The README's peak: 200 sensors every 10 s plus 3 observations a minute (what bench-outage sends), with headroom."""
    outage = 48 * 3600 * 200 // 10 + 48 * 60 * 3
    assert Settings().high_water_entries >= 1.04 * outage


def test_room_counts_memory_used_by_kept_records():
    settings = Settings(high_water_entries=10**9, high_water_memory_fraction=0.9)
    empty = Fill(depth=0, used_memory=0, maxmemory=1_000 * sizing.BUFFERED_TXN_BYTES)
    kept = Fill(depth=0, used_memory=500 * sizing.BUFFERED_TXN_BYTES, maxmemory=empty.maxmemory)
    assert (sizing.room(empty, settings), sizing.room(kept, settings)) == (900, 400)
    assert sizing.room(Fill(depth=5, used_memory=0, maxmemory=0), Settings(high_water_entries=7)) == 2


def keep_finished(buffer, count: int) -> None:
    """``count`` transactions of an earlier outage, buffered with idempotency keys, drained and confirmed."""
    buffer.ensure_group()
    pipe = buffer.client.pipeline(transaction=False)
    for _ in range(count):
        key = str(uuid.uuid4())
        txn = build_transaction([StepIn(table="housekeeping_sample", values=sample())], "test", key)
        buffer._enqueue(**buffer.enqueue_call(txn, answer(txn, State.accepted), ("logger", key), "0" * 64, ()), client=pipe)
    pipe.execute()
    while entries := buffer.claim("test", 1000):
        txn_ids = [str(decode(e.envelope).txn_id) for e in entries]
        buffer.settle([Settlement("committed", e.stream_id, t) for e, t in zip(entries, txn_ids, strict=True)], Lsn(16), "x")
    assert drain.confirm(buffer, Lsn(16)).confirmed == count


def test_backpressure_engages_where_the_measured_bytes_say_with_finished_transactions_kept(
    own_redis, api_client, auth_headers, monkeypatch
):
    from ingest_api import deps
    from opsync.config import get_settings

    monkeypatch.setenv("OPSYNC_BACKPRESSURE_CACHE_S", "0")
    get_settings.cache_clear()
    headers = auth_headers("housekeeping_sample")
    client: redis.Redis = own_redis.client()
    settings = get_settings()
    # BUFFERED_TXN_BYTES is measured with the idempotency buckets as full as the README's peak fills them
    # (bench-buffer-memory's peak_buckets): these few thousand records get as few buckets as a peak's window.
    peak = round((KEPT + ROOM) * IDEMPOTENCY_BUCKETS * IDEMPOTENCY_WINDOWS / (PEAK_TXNS_PER_S * settings.idempotency_ttl_s))
    monkeypatch.setattr(deps.get_buffer(), "idempotency_buckets_per_window", max(1, peak))
    keep_finished(deps.get_buffer(), KEPT)
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory", int((used + ROOM * sizing.BUFFERED_TXN_BYTES) / settings.high_water_memory_fraction))
    try:
        fill = Fill(depth=0, used_memory=used, maxmemory=int(client.config_get("maxmemory")["maxmemory"]))
        assert abs(sizing.room(fill, settings) - ROOM) <= 1
        accepted = 0
        while (response := api_client.post(HK, json=sample(), headers=headers | {"Idempotency-Key": str(uuid.uuid4())})).status_code == 202:
            accepted += 1
            assert accepted < 3 * ROOM, "backpressure never engaged"
        assert response.status_code == 503 and "maxmemory" in response.json()["detail"], response.text
        # Within a quarter of the prediction: BUFFERED_TXN_BYTES is what a POST costs. (Sizing without the
        # kept records, ~KEPT * KEPT_TXN_BYTES, would have promised nearly twice as many.)
        assert 0.75 * ROOM <= accepted <= 1.25 * ROOM, accepted
    finally:
        client.config_set("maxmemory", 0)
