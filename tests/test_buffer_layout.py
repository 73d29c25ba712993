"""The buffer's compact Redis layout: replicated statuses in bucket hashes, packed idempotency records,
confirmation in bounded bulk calls; and records of the earlier layout, still read and drained."""

import hashlib
import json
import uuid
from datetime import UTC, datetime

import pytest

import opsync.buffer.stream
from opsync import drain
from opsync.buffer import Buffer, IdempotencyConflict, Settlement, idempotency_field
from opsync.buffer.codec import decode, encode
from opsync.envelope import Op, State, Step, Transaction
from opsync.ids import new_id
from opsync.ingest import StepIn, answer, build_transaction
from opsync.lsn import Lsn

AT = "2026-12-07T06:00:00.123456+00:00"


@pytest.fixture
def buffer(redis_server):
    return Buffer(redis_server.client(), prefix=f"layout-{uuid.uuid4().hex[:8]}", status_ttl_s=4321)


def housekeeping(steps: int = 1, key: str | None = None):
    """A transaction of ``steps`` housekeeping samples, as the API builds it (references are not checked here)."""
    rows = [
        StepIn(
            table="housekeeping_sample",
            values={
                "instrument_module_id": str(uuid.uuid4()),
                "sensor": "mixer",
                "sampled_at": "2026-11-21T02:00:00Z",
                "value": 4.2,
                "unit": "K",
            },
        )
        for _ in range(steps)
    ]
    return build_transaction(rows, "test", key)


def stored(buffer: Buffer, idempotency: tuple[str, str]) -> bytes | None:
    """The idempotency record the current window's bucket holds for ``idempotency``."""
    return buffer.client.hget(buffer.idempotency_buckets(idempotency)[0][0], idempotency_field(*idempotency))


def body_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def settle_committed(buffer: Buffer, lsn: int) -> list[str]:
    """Claim everything and settle it committed at ``lsn`` (no primary: what Redis holds is under test)."""
    entries = buffer.claim("test", 10_000)
    txn_ids = [str(decode(e.envelope).txn_id) for e in entries]
    buffer.settle([Settlement("committed", e.stream_id, t) for e, t in zip(entries, txn_ids, strict=True)], Lsn(lsn), AT)
    return txn_ids


def test_a_replicated_status_moves_into_its_bucket_with_every_figure_kept(buffer):
    buffer.ensure_group()
    txns = [housekeeping() for _ in range(3)]
    for txn in txns:
        buffer.enqueue(txn, answer(txn, State.accepted), ("script", str(uuid.uuid4())), body_hash("x"), in_replica=())
    settle_committed(buffer, 0x3000)
    committed = buffer.statuses([t.txn_id for t in txns])

    assert drain.confirm(buffer, Lsn(0x3000)).confirmed == 3

    for txn, before, after in zip(txns, committed, buffer.statuses([t.txn_id for t in txns]), strict=True):
        assert not buffer.client.exists(buffer.status_key(txn.txn_id))
        bucket, _ = buffer.final_key(txn.txn_id)
        assert 4321 - 5 <= buffer.client.ttl(bucket) <= 4321
        expected = {k: v for k, v in before.items() if k != "stream_id"} | {"state": "replicated"}
        assert after == expected | {"replicated_at": after["replicated_at"]}
        assert after["accepted_at"] == txn.accepted_at.isoformat() and after["committed_at"] == AT
        assert after["tables"] == "housekeeping_sample" and after["commit_lsn"] == str(Lsn(0x3000))
    assert drain.confirm(buffer, Lsn(0x3000)).confirmed == 0  # idempotent


def test_a_redelivered_duplicate_of_a_replicated_transaction_stays_replicated(buffer):
    """SETTLE finds the status in its bucket: a duplicate does not make it committed (and awaiting) again."""
    buffer.ensure_group()
    txn = housekeeping()
    buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    [txn_id] = settle_committed(buffer, 0x1000)
    drain.confirm(buffer, Lsn(0x1000))
    again = buffer.client.xadd(buffer.stream, {"txn": encode(txn)})
    buffer.claim("test", 10)
    buffer.settle([Settlement("duplicate", again.decode(), txn_id)], Lsn(0x2000), AT)
    assert buffer.status(txn_id)["state"] == "replicated"
    assert buffer.client.zcard(buffer.awaiting_replica) == 0


def test_confirmation_in_bulk_stops_at_its_budget_and_the_rest_follow(buffer, monkeypatch):
    monkeypatch.setattr(opsync.buffer.stream, "CONFIRM_STEPS", 3)
    buffer.ensure_group()
    txns = [housekeeping(steps=4) for _ in range(5)] + [housekeeping() for _ in range(20)]
    for txn in txns:
        buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    settle_committed(buffer, 0x1000)
    due = [(str(t.txn_id), s["stream_id"]) for t, s in zip(txns, buffer.statuses([t.txn_id for t in txns]), strict=True)]

    assert buffer.mark_replicated(due, AT) == len(txns)

    assert {s["state"] for s in buffer.statuses([t.txn_id for t in txns])} == {"replicated"}
    assert buffer.client.xlen(buffer.stream) == 0
    assert not [k for part in ("row", "b", "dir", "rows", "idx") for k in buffer.client.keys(f"{buffer.prefix}:{part}:*")]


def committed_housekeeping(buffer: Buffer, n: int) -> list[tuple[str, str]]:
    """``n`` single-record transactions buffered and settled committed: (txn_id, stream_id) of each, due at 0x1000."""
    buffer.ensure_group()
    txns = [housekeeping() for _ in range(n)]
    for txn in txns:
        buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    settle_committed(buffer, 0x1000)
    return [(str(t.txn_id), s["stream_id"]) for t, s in zip(txns, buffer.statuses([t.txn_id for t in txns]), strict=True)]


def replicated(buffer: Buffer, due: list[tuple[str, str]]) -> int:
    return sum(s["state"] == "replicated" for s in buffer.statuses([t for t, _ in due]))


def test_confirmation_larger_than_a_call_goes_one_call_at_a_time(buffer, monkeypatch):
    """Each CONFIRM call is sent alone, after the one before has run: pipelined, Redis would run them back to
    back and every POST would wait behind all of them."""
    monkeypatch.setattr(opsync.buffer.stream, "CONFIRM_TRANSACTIONS", 2)
    due = committed_housekeeping(buffer, 7)
    confirm, before_each = buffer._confirm, []

    def counted(**kwargs):
        before_each.append(replicated(buffer, due))
        return confirm(**kwargs)

    monkeypatch.setattr(buffer, "_confirm", counted)
    assert buffer.mark_replicated(due, AT) == 7
    assert before_each == [0, 2, 4, 6] and replicated(buffer, due) == 7


def test_a_crash_between_confirm_calls_leaves_the_rest_awaiting_and_the_next_confirm_finishes(buffer, monkeypatch):
    monkeypatch.setattr(opsync.buffer.stream, "CONFIRM_TRANSACTIONS", 2)
    due = committed_housekeeping(buffer, 7)
    confirm, calls = buffer._confirm, []

    def dies_at_the_third_call(**kwargs):
        calls.append(kwargs)
        if len(calls) == 3:
            raise RuntimeError("confirmer killed between two CONFIRM calls")
        return confirm(**kwargs)

    monkeypatch.setattr(buffer, "_confirm", dies_at_the_third_call)
    with pytest.raises(RuntimeError):
        drain.confirm(buffer, Lsn(0x1000))
    assert replicated(buffer, due) == 4  # the first two calls, whole
    assert buffer.client.zcard(buffer.awaiting_replica) == 3 and buffer.client.xlen(buffer.stream) == 3
    assert len(buffer.client.keys(f"{buffer.prefix}:row:*")) == 3  # the rest still show in the overlay

    monkeypatch.setattr(buffer, "_confirm", confirm)
    assert drain.confirm(buffer, Lsn(0x1000)).confirmed == 3

    assert replicated(buffer, due) == 7 and buffer.client.zcard(buffer.awaiting_replica) == 0
    assert buffer.client.xlen(buffer.stream) == 0 and not buffer.client.keys(f"{buffer.prefix}:row:*")


def test_idempotency_records_of_the_earlier_layout_still_replay_and_conflict(buffer):
    """A site upgraded with transactions buffered: their records (a hash of body_hash and the JSON answer)
    answer retries as before, through the enqueue script and through the direct-write path."""
    txn = housekeeping(key="k1")
    original = answer(txn, State.accepted)
    old = buffer.idempotency_key("script", "k1")
    buffer.client.hset(old, mapping={"body_hash": body_hash("body"), "response": json.dumps(original), "txn_id": str(txn.txn_id)})

    retry = housekeeping(key="k1")
    replayed = buffer.enqueue(retry, answer(retry, State.accepted), ("script", "k1"), body_hash("body"), in_replica=())
    assert replayed.replayed and replayed.response == original
    assert buffer.replay(("script", "k1"), body_hash("body")) == original
    with pytest.raises(IdempotencyConflict):
        buffer.enqueue(retry, answer(retry, State.accepted), ("script", "k1"), body_hash("other"), in_replica=())
    with pytest.raises(IdempotencyConflict):
        buffer.replay(("script", "k1"), body_hash("other"))
    assert buffer.client.xlen(buffer.stream) == 0


def test_packed_idempotency_records_answer_exactly_the_original(buffer):
    txn = housekeeping(steps=2, key="k2")
    original = answer(txn, State.accepted)
    first = buffer.enqueue(txn, original, ("script", "k2"), body_hash("body"), in_replica=())
    retry = housekeeping(key="k2")
    again = buffer.enqueue(retry, answer(retry, State.accepted), ("script", "k2"), body_hash("body"), in_replica=())
    assert (first.replayed, again.replayed) == (False, True)
    assert again.response == first.response == json.loads(json.dumps(original))
    assert len(stored(buffer, ("script", "k2"))) < len(json.dumps(original))
    committed = {"txn_id": str(txn.txn_id), "ids": [], "state": "committed", "accepted_at": AT, "commit_lsn": "0/10"}
    buffer.remember(("script", "k3"), body_hash("b"), committed)
    assert buffer.replay(("script", "k3"), body_hash("b")) == committed


def test_idempotency_records_are_fields_of_bucket_hashes_that_expire_whole_after_the_ttl(buffer):
    """No key per record: a small record joins its window's bucket (a listpack), which expires a TTL after the
    window ends; a record of an earlier window still answers; one too large for a bucket keeps its own key."""
    buffer.idempotency_ttl_s = 800
    txn = housekeeping(key="b1")
    first = buffer.enqueue(txn, answer(txn, State.accepted), ("script", "b1"), body_hash("body"), in_replica=())
    buckets, _ = buffer.idempotency_buckets(("script", "b1"))
    assert buffer.client.keys(f"{buffer.prefix}:idem:*") == [buckets[0].encode()]
    assert buffer.client.object("encoding", buckets[0]) == b"listpack"
    assert 800 <= buffer.client.ttl(buckets[0]) <= 800 + 100  # the TTL, plus at most a window (an eighth of it)

    earlier = ("script", "b2")
    record = stored(buffer, ("script", "b1"))
    buffer.client.hset(buffer.idempotency_buckets(earlier)[0][-1], idempotency_field(*earlier), record)
    retry = housekeeping(key="b2")
    replayed = buffer.enqueue(retry, answer(retry, State.accepted), earlier, body_hash("body"), in_replica=())
    assert replayed.replayed and replayed.response == first.response
    assert buffer.replay(earlier, body_hash("body")) == first.response
    with pytest.raises(IdempotencyConflict):
        buffer.enqueue(retry, answer(retry, State.accepted), earlier, body_hash("other"), in_replica=())

    long_key = ("script", "k" * 200)
    buffer.enqueue(housekeeping(), answer(txn, State.accepted), long_key, body_hash("body"), in_replica=())
    assert 0 < buffer.client.ttl(buffer.idempotency_key(*long_key)) <= 800
    assert buffer.replay(long_key, body_hash("body")) == first.response
    buffer.remember(("script", "b3"), body_hash("b"), first.response)
    assert stored(buffer, ("script", "b3")) and buffer.replay(("script", "b3"), body_hash("b")) == first.response
    assert buffer.client.xlen(buffer.stream) == 2


def test_records_of_their_own_key_written_before_the_buckets_still_replay(buffer):
    txn = housekeeping(key="o1")
    original = answer(txn, State.accepted)
    buffer.enqueue(txn, original, ("script", "o1"), body_hash("body"), in_replica=())
    record = stored(buffer, ("script", "o1"))
    buffer.client.set(buffer.idempotency_key("script", "o2"), record, ex=60)  # as written before the buckets
    retry = housekeeping(key="o2")
    replayed = buffer.enqueue(retry, answer(retry, State.accepted), ("script", "o2"), body_hash("body"), in_replica=())
    assert replayed.replayed and replayed.response == json.loads(json.dumps(original))
    assert buffer.replay(("script", "o2"), body_hash("body")) == replayed.response
    with pytest.raises(IdempotencyConflict):
        buffer.replay(("script", "o2"), body_hash("other"))
    assert stored(buffer, ("script", "o2")) is None and buffer.client.xlen(buffer.stream) == 1


def test_an_accepted_answer_is_kept_in_binary_and_text_records_of_the_earlier_layout_still_replay(buffer):
    """One row's 202 takes 57 bytes (marker, body hash, txn_id, accepted_at, id), not its 118 of text; a
    record of the text layout (a length byte, the hash, '|'-separated values) answers retries as before."""
    txn = housekeeping(key="k4")
    original = answer(txn, State.accepted)
    buffer.enqueue(txn, original, ("script", "k4"), body_hash("body"), in_replica=())
    assert len(stored(buffer, ("script", "k4"))) == 1 + 16 + 16 + 8 + 16
    assert buffer.replay(("script", "k4"), body_hash("body")) == json.loads(json.dumps(original))

    old = housekeeping(key="k5")
    text = f"{old.txn_id}||{old.accepted_at.isoformat().removesuffix('+00:00')}|{old.steps[0].key}".encode()
    buffer.client.set(buffer.idempotency_key("script", "k5"), bytes([16]) + bytes.fromhex(body_hash("body"))[:16] + text)
    retry = housekeeping(key="k5")
    replayed = buffer.enqueue(retry, answer(retry, State.accepted), ("script", "k5"), body_hash("body"), in_replica=())
    assert replayed.replayed and replayed.response == json.loads(json.dumps(answer(old, State.accepted)))
    assert buffer.replay(("script", "k5"), body_hash("body")) == replayed.response
    with pytest.raises(IdempotencyConflict):
        buffer.enqueue(retry, answer(retry, State.accepted), ("script", "k5"), body_hash("other"), in_replica=())


def test_statuses_of_the_earlier_layout_stay_readable_and_drain(buffer):
    """Replicated statuses kept whole (before the buckets) read as before; buffered entries drain and confirm."""
    buffer.ensure_group()
    done = str(uuid.uuid4())
    buffer.client.hset(buffer.status_key(done), mapping={"state": "replicated", "accepted_at": AT, "replicated_at": AT})
    txn = housekeeping()
    buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    settle_committed(buffer, 0x1000)
    assert drain.confirm(buffer, Lsn(0x1000)).confirmed == 1
    assert [s["state"] for s in buffer.statuses([done, txn.txn_id, uuid.uuid4()]) if s] == ["replicated", "replicated"]


def key_at(millis: int) -> str:
    """A UUIDv7 row key of that millisecond."""
    return str(uuid.UUID(int=(millis << 80) | (0x7 << 76) | (uuid.uuid4().int & ((1 << 76) - 1)) & ~(0b11 << 62) | (0b10 << 62)))


def test_indexes_are_listpack_buckets_of_key_time_listed_in_order_across_them(buffer):
    """Rows 1 s apart over ~20 s fall into ~5 buckets, each a listpack; pages of 3 walk them all, in key order,
    each key once, whether filtered (one value's index, intersected with another's) or not."""
    start = 1_800_000_000_000
    keys = [key_at(start + i * 1000) for i in range(20)]
    for i, key in enumerate(keys):
        txn = build_transaction(
            [
                StepIn(
                    table="housekeeping_sample",
                    id=key,
                    values={
                        "instrument_module_id": str(uuid.UUID(int=i % 2)),
                        "sensor": "mixer",
                        "sampled_at": "2026-11-21T02:00:00Z",
                        "value": 4.2,
                        "unit": "K",
                    },
                )
            ],
            "test",
        )
        buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    rows = buffer.rows_index("housekeeping_sample")
    buckets = buffer.client.zrange(f"{buffer.prefix}:dir:{rows}", 0, -1)
    assert len(buckets) >= 4 and buffer.index_buckets(rows) == len(buckets)
    assert {buffer.client.object("encoding", f"{buffer.prefix}:b:{b.decode()}:{rows}") for b in buckets} == {b"listpack"}

    def walk(index, size=3):
        seen, after = [], None
        while page := buffer.index_range(index, after, size):
            seen, after = seen + page, page[-1]
        return seen

    assert walk(rows) == sorted(keys)
    even = buffer.field_index("housekeeping_sample", "instrument_module_id", str(uuid.UUID(int=0)))
    assert walk(even) == sorted(keys[::2])
    assert buffer.index_contains(even, keys[:4]) == [True, False, True, False]


def test_an_index_of_the_earlier_layout_is_still_listed_and_released(buffer):
    """A site upgraded with rows buffered: their row hashes and single sorted-set indexes are listed with the
    new buckets, and confirming their transaction releases them from it."""
    buffer.ensure_group()
    old, new = housekeeping(), housekeeping()
    buffer.enqueue(old, answer(old, State.accepted), in_replica=())
    old_key, new_key = str(old.steps[0].key), str(new.steps[0].key)
    rows = buffer.rows_index("housekeeping_sample")
    sensor = buffer.field_index("housekeeping_sample", "sensor", "mixer")
    for index in (rows, sensor):  # as the earlier layout held it
        buffer.client.delete(buffer.index_bucket(index, old_key), f"{buffer.prefix}:dir:{index}")
        buffer.client.zadd(f"{buffer.prefix}:{index}", {old_key: 0})
    buffer.enqueue(new, answer(new, State.accepted), in_replica=())

    assert buffer.index_range(rows, None, 10) == sorted([old_key, new_key])
    assert buffer.index_contains(sensor, [old_key, new_key]) == [True, True]
    settle_committed(buffer, 0x1000)
    assert drain.confirm(buffer, Lsn(0x1000)).confirmed == 2
    assert buffer.index_range(rows, None, 10) == [] and buffer.index_contains(sensor, [old_key]) == [False]
    assert not buffer.client.exists(f"{buffer.prefix}:{rows}", f"{buffer.prefix}:{sensor}")


def test_a_status_on_its_way_is_a_bucket_field_and_one_of_the_earlier_layout_still_drains(buffer):
    """Accepted and committed statuses are fields of the 'on' bucket of their window (no hash of their own),
    with every figure; an accepted status hash written before the buckets settles and confirms as before."""
    buffer.ensure_group()
    txn, old = housekeeping(), housekeeping()
    buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    buffer.enqueue(old, answer(old, State.accepted), in_replica=())
    old_status = buffer.status(old.txn_id)
    buffer.client.hdel(*buffer.travel_key(old.txn_id))
    buffer.client.hset(buffer.status_key(old.txn_id), mapping=old_status)  # as the earlier layout wrote it
    status = buffer.status(txn.txn_id)
    assert status == {
        "state": "accepted",
        "stream_id": status["stream_id"],
        "accepted_at": txn.accepted_at.isoformat(),
        "tables": "housekeeping_sample",
    }
    assert not buffer.client.exists(buffer.status_key(txn.txn_id))
    assert buffer.client.object("encoding", buffer.travel_key(txn.txn_id)[0]) == b"listpack"

    settle_committed(buffer, 0x1000)
    committed = buffer.statuses([txn.txn_id, old.txn_id])
    assert [s["state"] for s in committed] == ["committed", "committed"]
    assert committed[0] == status | {"state": "committed", "committed_at": AT, "commit_lsn": "0/1000"}
    assert not buffer.client.exists(buffer.status_key(txn.txn_id))
    assert drain.confirm(buffer, Lsn(0x1000)).confirmed == 2
    done = buffer.statuses([txn.txn_id, old.txn_id])
    assert [s["state"] for s in done] == ["replicated", "replicated"] and done[0]["commit_lsn"] == "0/1000"
    assert not buffer.client.hexists(*buffer.travel_key(txn.txn_id)) and not buffer.client.exists(buffer.status_key(old.txn_id))


def test_natural_keys_are_bucketed_by_their_first_bytes_and_listed_in_byte_order(buffer):
    """Text keys (the buffer carries any key as text): ASCII and not, sharing a prefix and not, with a comma, a
    space, mixed case; the buckets are cut by bytes as the Lua scripts cut them, so membership finds each key and
    pages walk them in byte order (Python's str order, which the merged view merges by)."""
    keys = ["a,b", "B 1", "Z", "üüüüüüü-1", "üüüüüüü-2", "ü", "SITE-000001", "SITE-000002", "SITE-0000012", "日本語のサイト"]
    even = str(uuid.UUID(int=0))
    for i, key in enumerate(keys):
        module = even if i % 2 == 0 else str(uuid.UUID(int=1))
        values = {"instrument_module_id": module, "sensor": "mixer", "sampled_at": "2026-11-21T02:00:00Z", "value": 4.2, "unit": "K"}
        step = Step.admitted(values, op=Op.insert, table="housekeeping_sample", key=key, values=values)
        txn = Transaction(txn_id=new_id(), site="test", accepted_at=datetime.now(UTC), steps=[step])
        buffer.enqueue(txn, answer(txn, State.accepted), in_replica=())
    rows = buffer.rows_index("housekeeping_sample")

    def walk(index, size=3):
        seen, after = [], None
        while page := buffer.index_range(index, after, size):
            seen, after = seen + page, page[-1]
        return seen

    assert walk(rows) == sorted(keys)
    assert buffer.index_contains(rows, [*keys, "nope", "üüüüüüü-3"]) == [True] * len(keys) + [False, False]
    indexed = buffer.field_index("housekeeping_sample", "instrument_module_id", even)
    assert walk(indexed) == sorted(keys[::2])
    assert buffer.index_contains(indexed, keys) == [i % 2 == 0 for i in range(len(keys))]
    assert set(buffer.overlay_rows("housekeeping_sample", keys)) == set(keys)
    assert buffer.overlaid("housekeeping_sample", [*keys, "nope"]) == keys
    gone = Step(op=Op.delete, table="housekeeping_sample", key="x,y")  # not buffered: the replica vouches for it
    txn = Transaction(txn_id=new_id(), site="test", accepted_at=datetime.now(UTC), steps=[gone])
    assert not buffer.enqueue(txn, answer(txn, State.accepted), in_replica=["housekeeping_sample:x,y"]).replayed
