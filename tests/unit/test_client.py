"""The client's logic that is free of I/O, shared by the sync and the async client: following a transaction's
state (``Following``), one call's retries (``Attempts``), and the JSON and chunks it sends. Against the real
API: tests/test_client.py."""

import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from opsync.client import (
    RECONNECT_S,
    ApiError,
    Attempts,
    Following,
    State,
    TransactionFailed,
    Unavailable,
    chunked,
    encode,
    seconds,
    write,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_following_orders_the_states_and_honours_retry_after():
    """The state logic both clients share: past the wanted state counts, a 503's Retry-After is the pause."""
    clock, txn = Clock(), str(uuid.uuid4())
    following = Following(txn, "committed", timeout=30, clock=clock)
    lines = [
        "event: ready",
        f"data: {json.dumps({'following': [txn]})}",
        "",
        ": keep-alive",
        "",
        f"data: {json.dumps({'txn_id': txn, 'state': 'accepted', 'snapshot': True})}",
        "",
        f"data: {json.dumps({'txn_id': str(uuid.uuid4()), 'state': 'replicated'})}",
        "",  # another's
        "data: {",
        f'data: "txn_id": "{txn}", "state": "committed"}}',
        "retry: 1000",
    ]  # one value on two lines ...
    assert [following.line(line) for line in lines] == [None] * len(lines) and following.last == "accepted"
    assert following.line("") is State.committed and following.last == "committed"  # ... complete at its blank line
    assert following.pause() == RECONNECT_S
    assert not following.opened(httpx.Response(503, headers={"Retry-After": "7"}))
    assert following.pause() == 7 and following.pause() == RECONNECT_S  # that answer's, once
    clock.now = 27
    assert not following.opened(httpx.Response(503, headers={"Retry-After": "7"})) and following.pause() == 3  # within the deadline
    assert following.polled(httpx.Response(200, json={"txn_id": txn, "state": "replicated"})) is State.replicated
    assert following.polled(httpx.Response(200, json={"txn_id": txn, "state": "teleported"})) is None  # not one it knows
    with pytest.raises(ApiError) as closed:
        [following.line(line) for line in ["event: closed", 'data: {"detail": "token revoked"}', ""]]
    assert closed.value.status == 401 and closed.value.detail == "token revoked"
    with pytest.raises(ValueError, match="cannot wait for failed"):
        Following(txn, "failed", timeout=1)


def test_a_wait_tries_once_even_without_time_and_again_only_while_time_is_left():
    clock = Clock()
    none_left = Following(uuid.uuid4(), "accepted", timeout=0, clock=clock)
    assert list(none_left) == [0]
    following, tried = Following(uuid.uuid4(), "accepted", timeout=10, clock=clock), []
    for attempt in following:
        tried.append(attempt)
        clock.now += 4
    assert tried == [0, 1, 2]
    assert str(following.timed_out()) == f"transaction {following.txn_id} not accepted within 10 s (last state seen: none)"


def test_a_failed_transaction_ends_the_wait_with_its_reason_from_the_stream_or_the_status():
    txn = str(uuid.uuid4())
    streamed = Following(txn, "replicated", timeout=5)
    assert streamed.line(f"data: {json.dumps({'txn_id': txn, 'state': 'failed', 'reason': 'duplicate key'})}") is None
    with pytest.raises(TransactionFailed, match="failed \\(dead-lettered\\): duplicate key"):
        streamed.line("")
    with pytest.raises(TransactionFailed, match="no reason given") as failed:
        Following(txn, "replicated", timeout=5).polled(httpx.Response(200, json={"txn_id": txn, "state": "failed"}))
    assert failed.value.txn_id == txn
    with pytest.raises(ApiError) as unknown:
        Following(txn, "replicated", timeout=5).polled(httpx.Response(404, json={"detail": "unknown transaction"}))
    assert (unknown.value.status, unknown.value.detail) == (404, "unknown transaction")


def test_a_call_retries_transient_failures_and_raises_the_last_one_after_its_retries():
    attempts = Attempts(write("POST", "/v1/records/t", {"a": 1}, "key"), retries=2)
    failures = iter([httpx.ConnectError("refused"), Unavailable(503, "busy", "POST", "/v1/records/t"), httpx.ReadTimeout("slow")])
    with pytest.raises(Unavailable, match="ReadTimeout") as last:
        for _ in attempts:
            with attempts.guard():
                raise next(failures)
    assert attempts.attempt == 2 and last.value.status is None

    busy = Attempts(write("POST", "/v1/records/t", {"a": 1}, "key"), retries=1)
    with pytest.raises(Unavailable):
        busy.settle(httpx.Response(503, headers={"Retry-After": "4"}, json={"detail": "buffer full"}))
    assert busy.retry_after == 4
    with pytest.raises(ApiError) as refused:
        busy.settle(httpx.Response(422, json={"detail": [{"loc": ["body", "a"]}]}))
    assert refused.value.status == 422


def test_the_idempotency_key_is_given_or_new_and_the_same_for_every_retry():
    given = write("POST", "/v1/records/t", [], "mine")
    assert given.headers == {"Idempotency-Key": "mine"}
    fresh = write("POST", "/v1/records/t", [], None)
    assert uuid.UUID(fresh.headers["Idempotency-Key"]) and fresh.headers != write("POST", "/v1/records/t", [], None).headers
    http = httpx.Client(base_url="http://api")
    assert fresh.request(http).headers["Idempotency-Key"] == fresh.request(http).headers["Idempotency-Key"]


def test_uuids_and_aware_times_are_sent_as_the_api_reads_them_and_other_objects_are_refused():
    key, at = uuid.UUID("0190c0de-0000-7000-8000-000000000001"), datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    assert json.loads(encode({"id": key, "at": at})) == {"id": str(key), "at": "2026-12-07T03:00:00+00:00"}
    with pytest.raises(TypeError, match="cannot encode set"):
        encode({"tags": {"a"}})


def test_long_lists_are_cut_into_chunks_in_order():
    assert chunked([{"n": n} for n in range(5)], 2) == [[{"n": 0}, {"n": 1}], [{"n": 2}, {"n": 3}], [{"n": 4}]]
    assert chunked([], 2) == []
    with pytest.raises(ValueError, match="at least 1, got 0"):
        chunked([{"n": 1}], 0)


@pytest.mark.parametrize(
    ("header", "pause"), [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), (None, None), ("Wed, 21 Oct 2026 07:28:00 GMT", None)]
)
def test_retry_after_is_read_in_seconds_and_an_http_date_is_ignored(header, pause):
    assert seconds(header) == pause
