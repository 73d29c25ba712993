"""``OpsyncClient`` and ``AsyncOpsyncClient`` against the real ingest API served over TCP.

Faults are real: a proxy that loses the API's answer after the API acted on the request, a port
nobody listens on yet, the primary stopped (direct tables answer 503). Each test runs with both
clients; ``Flavour`` gives them one blocking interface so each scenario is written once.
"""

import asyncio
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from opsync import envelope
from opsync.buffer import Buffer
from opsync.buffer.codec import decode
from opsync.client import (
    MAX_RECORDS_PER_REQUEST,
    RECONNECT_S,
    ApiError,
    AsyncOpsyncClient,
    OpsyncClient,
    Receipt,
    State,
    TransactionFailed,
    TransactionStatus,
    WaitTimeout,
)

T = "executed_obs_unit"
DIRECT = "instrument"


class Proxy:
    """TCP proxy in front of the API; the first ``lose`` connections lose the answer.

    A lost answer is forwarded to the API, which acts on it, and then the client's connection is
    closed before any byte of the answer reaches it: what a link dropping at the wrong moment does.
    A connection whose first request line contains ``refuse`` is closed unanswered (a proxy that
    cannot pass that route).
    """

    def __init__(self, target_port: int, lose: int = 0, port: int = 0, refuse: bytes | None = None):
        self.target_port = target_port
        self.lose = lose
        self.refuse = refuse
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._relay, args=(client, self.connections <= self.lose), daemon=True).start()

    def _relay(self, client: socket.socket, lose: bool) -> None:
        if self.refuse and self.refuse in client.recv(65536, socket.MSG_PEEK).split(b"\r\n")[0]:
            close(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self._sockets += [client, upstream]
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        if lose:
            upstream.recv(1)  # the API has answered, so it has done the work ...
            for sock in (client, upstream):  # ... and the answer is lost
                close(sock)
        else:
            pump(upstream, client)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            close(sock)


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        close(source)
        close(sink)


def close(sock: socket.socket) -> None:
    """Shutdown first: it wakes a thread blocked in ``recv`` on it, which ``close`` alone does not."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Flavour:
    """A client of either kind behind one blocking interface; ``delays`` are the backoff sleeps it asked for.

    The async client lives on its own event loop in a thread (its connections belong to that loop);
    ``on_sleep(n)`` runs at the n-th sleep, which is where a test repairs the fault it staged. Sleeps
    are skipped unless ``sleeps`` (a wait must pause between its streams to let time pass).
    """

    def __init__(self, kind: str, base_url: str, token: str, on_sleep: Callable[[int], None], sleeps: bool = False, **options):
        self.kind = kind
        self.delays: list[float] = []

        def note(seconds: float) -> None:
            self.delays.append(seconds)
            on_sleep(len(self.delays))
            if sleeps:
                time.sleep(seconds)

        async def async_note(seconds: float) -> None:
            await asyncio.to_thread(note, seconds)

        options = {"retries": 3, "backoff": 0.05, "max_backoff": 0.2} | options
        if kind == "sync":
            self.client = OpsyncClient(base_url, token, sleep=note, **options)
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = AsyncOpsyncClient(base_url, token, sleep=async_note, **options)

    def call(self, name: str, *args, **kwargs) -> Any:
        result = getattr(self.client, name)(*args, **kwargs)
        return result if self.kind == "sync" else self._await(result)

    def _await(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=120)

    def close(self) -> None:
        if self.kind == "sync":
            self.client.close()
            return
        self._await(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def token(issue_token) -> str:
    return issue_token([f"write:{T}", f"read:{T}", f"write:{DIRECT}"])


@pytest.fixture
def stream(redis_server):
    """The buffer's stream: its length, and the transactions in it."""
    client = redis_server.client()
    name = Buffer(client).stream

    class Stream:
        def __len__(self) -> int:
            return client.xlen(name)

        def txn_ids(self) -> list[str]:
            return [str(decode(fields[b"txn"]).txn_id) for _, fields in client.xrange(name)]

    return Stream()


@pytest.fixture
def client(kind, live_api, token):
    """``client(base_url=live_api, on_sleep=None, **options)``: a client of this test's kind, closed afterwards."""
    made = []

    def make(base_url: str = live_api, on_sleep: Callable[[int], None] = lambda n: None, token: str = token, **options) -> Flavour:
        made.append(Flavour(kind, base_url, token, on_sleep, **options))
        return made[-1]

    yield make
    for flavour in made:
        flavour.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_records_returns_ids_and_status_url(client, live_api, observation, stream):
    api = client()
    before = len(stream)
    one = api.call("records", T, observation())
    assert isinstance(one, Receipt) and one.state == "accepted" and len(one.ids) == 1 and one.id == one.ids[0]
    assert one.status_url == f"{live_api}/v1/transactions/{one.txn_id}"
    assert api.call("status", one.txn_id).state is State.accepted
    given = uuid.uuid4()
    several = api.call("records", T, [observation(id=given), observation(), observation()])
    assert len(several.ids) == 3 and several.ids[0] == given
    assert len(stream) == before + 2
    assert api.delays == []


def test_a_retry_after_a_lost_answer_does_not_duplicate(client, live_api, observation, stream):
    """The client keys the write itself, so the API replays the original answer to the retry."""
    proxy = Proxy(port_of(live_api), lose=1)
    try:
        api = client(f"http://127.0.0.1:{proxy.port}")
        before = len(stream)
        receipt = api.call("records", T, observation())
    finally:
        proxy.close()
    assert proxy.connections == 2 and len(api.delays) == 1  # lost once, retried once
    assert len(stream) == before + 1
    assert stream.txn_ids().count(str(receipt.txn_id)) == 1


def test_connection_errors_are_retried_with_backoff(client, live_api, observation, stream):
    """Nobody listens at first (connection refused); the API's proxy comes up during the second pause."""
    from conftest import free_port

    port, proxies = free_port(), []

    def come_up(pause: int) -> None:
        if pause == 2:
            proxies.append(Proxy(port_of(live_api), port=port))

    api = client(f"http://127.0.0.1:{port}", on_sleep=come_up, backoff=0.05, max_backoff=0.08)
    before = len(stream)
    try:
        receipt = api.call("records", T, observation())
    finally:
        for proxy in proxies:
            proxy.close()
    assert receipt.state == "accepted" and len(stream) == before + 1
    assert len(api.delays) == 2
    assert 0 <= api.delays[0] <= 0.05 and 0 <= api.delays[1] <= 0.08  # full jitter, capped


def test_503_is_retried_until_the_primary_is_back(client, pg, token):
    """A direct table needs the primary: 503 while it is stopped; it is started during the first pause."""
    pg.primary.stop()

    def primary_back(pause: int) -> None:
        if pause == 1:
            pg.primary.start()

    try:
        api = client(on_sleep=primary_back, retries=4)
        receipt = api.call("records", DIRECT, {"name": f"client-{uuid.uuid4()}"})
    finally:
        if pg.primary.pid() is None:
            pg.primary.start()
        pg.replica.wait_streaming()
    assert receipt.state == "committed" and receipt.commit_lsn
    assert len(api.delays) == 1


def test_backpressure_is_retried_no_sooner_than_retry_after(client, observation, stream, monkeypatch):
    """Above the high-water mark the API says when to come back; the client waits at least that long."""
    from opsync.config import get_settings

    def set_high_water(entries: int) -> None:
        monkeypatch.setenv("OPSYNC_HIGH_WATER_ENTRIES", str(entries))
        get_settings.cache_clear()

    monkeypatch.setenv("OPSYNC_RETRY_AFTER_S", "7")
    set_high_water(0)
    api = client(on_sleep=lambda pause: set_high_water(10**9), backoff=0.01, max_backoff=60)
    receipt = api.call("records", T, observation())
    assert receipt.state == "accepted" and stream.txn_ids()[-1] == str(receipt.txn_id)
    assert len(api.delays) == 1 and api.delays[0] >= 7


@pytest.mark.parametrize(
    "table, rows, status",
    [
        (T, {"start_time": "not a time"}, 422),
        (
            "raw_data_file",
            {  # valid, but the token lacks write:raw_data_file
                "executed_obs_unit_id": str(uuid.uuid4()),
                "path": "/data/x.fits",
                "size_bytes": 1,
                "checksum_sha256": "ab" * 32,
                "file_type": "fits",
            },
            403,
        ),
        ("no_such_table", {}, 422),
    ],
)
def test_a_4xx_raises_at_once(client, table, rows, status):
    api = client()
    with pytest.raises(ApiError) as raised:
        api.call("records", table, rows)
    assert raised.value.status == status and raised.value.detail
    assert api.delays == []  # no retry: the same request would fail the same way


def test_413_is_not_retried(client, site_env, observation):
    api = client()
    with pytest.raises(ApiError) as raised:
        api.call("records", T, [observation() for _ in range(site_env.max_records_per_request + 1)])
    assert raised.value.status == 413 and api.delays == []


def test_batches_send_at_most_the_servers_maximum_per_request(client, observation, stream):
    api = client()
    before = len(stream)
    ids = [uuid.uuid4() for _ in range(2 * MAX_RECORDS_PER_REQUEST + 100)]
    receipts = api.call("batches", T, [observation(id=str(i)) for i in ids])
    assert [len(r.ids) for r in receipts] == [MAX_RECORDS_PER_REQUEST, MAX_RECORDS_PER_REQUEST, 100]  # the API's default maximum
    assert [i for r in receipts for i in r.ids] == ids  # in order
    assert len(stream) == before + 3


def test_batches_with_a_key_are_replayed_not_duplicated(client, observation, stream):
    api = client()
    rows = [observation() for _ in range(7)]
    key = f"night-{uuid.uuid4()}"
    before = len(stream)
    first = api.call("batches", T, rows, size=3, idempotency_key=key)
    again = api.call("batches", T, rows, size=3, idempotency_key=key)
    assert [len(r.ids) for r in first] == [3, 3, 1]
    assert again == first and len(stream) == before + 3


def settle_later(primary_engine, replica_engine, delay: float = 0.5, until: threading.Event | None = None) -> threading.Thread:
    """Drain and confirm in the background after ``delay``, while a wait follows the events; again and again
    until ``until`` is set, when another process writes meanwhile."""
    from ingest_api import deps
    from opsync import drain

    def run() -> None:
        time.sleep(delay)
        buffer = deps.get_buffer()
        deadline = time.monotonic() + 30
        while True:
            drain.drain(buffer, primary_engine)
            while drain.confirm_replica(buffer, replica_engine).remaining and time.monotonic() < deadline:
                time.sleep(0.05)
            if until is None or until.wait(0.2) or time.monotonic() > deadline:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


LSN = re.compile(r"^[0-9A-F]+/[0-9A-F]+$")


def test_wait_follows_the_events_until_replicated_and_the_models_read_the_servers_answers(
    client, observation, primary_engine, replica_engine
):
    api = client(sleeps=True)
    receipt = api.call("records", T, observation())
    assert isinstance(receipt.accepted_at, datetime) and receipt.accepted_at.utcoffset() is not None
    assert api.call("wait", receipt.txn_id, "accepted", timeout=10) is State.accepted
    accepted = api.call("status", receipt.txn_id)
    assert (accepted.state, accepted.accepted_at, accepted.commit_lsn) == (State.accepted, receipt.accepted_at, None)
    settling = settle_later(primary_engine, replica_engine)
    assert api.call("wait", receipt.txn_id, "replicated", timeout=30) is State.replicated
    settling.join(30)
    assert api.call("wait", receipt.txn_id, "committed", timeout=5) is State.replicated  # past it counts
    done = api.call("status", receipt.txn_id)
    assert isinstance(done, TransactionStatus) and done.txn_id == receipt.txn_id and done.tables == [T]
    assert done.accepted_at == receipt.accepted_at <= done.committed_at <= done.replicated_at
    assert LSN.match(done.commit_lsn) and done.failed_at is None and done.reason is None
    assert api.delays == []  # the stream's snapshot and its pushed changes answered each wait


def test_the_clients_models_have_every_field_of_the_servers_and_keep_new_ones(live_api, token, observation):
    """Same fields as the API's own response model; a field a newer server adds is kept, a new state refused."""
    assert set(Receipt.model_fields) == set(envelope.Receipt.model_fields)
    with OpsyncClient(live_api, token) as api:
        txn_id = api.records(T, observation()).txn_id
        answer = httpx.get(f"{live_api}/v1/transactions/{txn_id}", headers={"Authorization": f"Bearer {token}"}).json()
    status = TransactionStatus.model_validate(answer | {"priority": "high"})
    assert status.state is State.accepted and status.model_extra["priority"] == "high"
    assert status.reached("accepted") and not status.reached(State.committed)
    assert TransactionStatus.model_validate(answer | {"state": "replicated"}).reached("committed")  # past it counts
    assert set(answer) - set(TransactionStatus.model_fields) <= {"stream_id"}  # where it sits in the buffer: no type needed
    with pytest.raises(ValueError, match="state"):
        TransactionStatus.model_validate(answer | {"state": "teleported"})


def test_a_wait_that_runs_out_names_the_transaction_and_the_last_state(client, observation):
    api = client(sleeps=True)
    receipt = api.call("records", T, observation())
    started = time.monotonic()
    with pytest.raises(TimeoutError) as late:
        api.call("wait", receipt.txn_id, "committed", timeout=1)
    assert time.monotonic() - started < 5
    assert isinstance(late.value, WaitTimeout) and late.value.last == "accepted" and late.value.wanted is State.committed
    assert str(late.value) == f"transaction {receipt.txn_id} not committed within 1 s (last state seen: accepted)"


def test_a_wait_that_cannot_have_the_stream_asks_the_status(client, live_api, observation):
    """A proxy in the way refuses the stream: the client pauses, then the status endpoint answers the wait."""
    receipt = client().call("records", T, observation())
    proxy = Proxy(port_of(live_api), refuse=b"/v1/events")
    try:
        api = client(f"http://127.0.0.1:{proxy.port}")
        assert api.call("wait", receipt.txn_id, "accepted", timeout=10) is State.accepted
    finally:
        proxy.close()
    assert proxy.connections == 2 and api.delays == [RECONNECT_S]  # the stream refused, then the status


def test_wait_raises_when_the_transaction_fails(client, issue_token, primary_engine, replica_engine):
    from tests.test_api_guarantees import raw_file

    api = client(sleeps=True, token=issue_token(["write:raw_data_file", "read:raw_data_file"]))
    receipt = api.call("records", "raw_data_file", raw_file())  # its observation does not exist: the primary refuses it
    settling = settle_later(primary_engine, replica_engine)
    with pytest.raises(TransactionFailed) as failed:
        api.call("wait", receipt.txn_id, "replicated", timeout=30)
    settling.join(30)
    assert failed.value.txn_id == str(receipt.txn_id) and failed.value.detail["state"] == "failed"
    assert "foreign key" in failed.value.reason or "violates" in failed.value.reason
    assert str(failed.value) == f"transaction {receipt.txn_id} failed (dead-lettered): {failed.value.reason}"
    status = api.call("status", receipt.txn_id)
    assert (status.state, status.reason) == (State.failed, failed.value.reason) and status.failed_at is not None


def run_example(name: str, *args: str, live_api: str, token: str, cwd) -> tuple[int, list[dict]]:
    """An example script run as a user would, against the real API: its exit code and its JSON lines."""
    import subprocess
    import sys

    from devstack.settings import REPO

    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), *args],
        env={**os.environ, "OPSYNC_API_URL": live_api, "OPSYNC_TOKEN": token},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout, done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_the_example_script_records_and_waits_until_replicated(live_api, token, observation, primary_engine, replica_engine, tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([observation(), observation()]))
    late, (out,) = run_example(
        "record_and_wait.py", T, str(rows), "--wait", "committed", "--timeout", "1", live_api=live_api, token=token, cwd=tmp_path
    )
    assert late == 2 and out["state"] == "accepted" and out["timed_out"]
    settling = settle_later(primary_engine, replica_engine, until=(done := threading.Event()))
    code, (out,) = run_example("record_and_wait.py", T, str(rows), "--timeout", "30", live_api=live_api, token=token, cwd=tmp_path)
    done.set()
    settling.join(30)
    assert code == 0 and out["state"] == "replicated" and len(out["ids"]) == 2


def test_the_async_example_follows_each_transaction_until_replicated(
    live_api, issue_token, observation, primary_engine, replica_engine, tmp_path
):
    from tests.test_api_guarantees import raw_file

    token = issue_token([f"write:{T}", "write:raw_data_file", "read:raw_data_file"])
    with OpsyncClient(live_api, token) as api:
        obs = str(api.records(T, observation()).id)  # drained first, in the stream's order
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([raw_file(executed_obs_unit_id=obs), raw_file(), raw_file(executed_obs_unit_id=obs)]))
    settling = settle_later(primary_engine, replica_engine, until=(done := threading.Event()))
    code, outs = run_example(
        "record_each_async.py", "raw_data_file", str(rows), "--timeout", "30", live_api=live_api, token=token, cwd=tmp_path
    )
    done.set()
    settling.join(30)
    assert code == 1 and [o["state"] for o in outs] == ["replicated", "failed", "replicated"]  # the 2nd names no observation
    assert outs[1]["reason"] and len({o["txn_id"] for o in outs}) == 3
