"""The demo night end to end through a real uvicorn server, and the client's retry discipline."""

import io
import json
import threading
import time
from collections import Counter
from datetime import date
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from rich.console import Console
from sqlalchemy import text

from devstack import demo as make_demo
from devstack.settings import StackSettings
from opsync.buffer import Buffer
from opsync.buffer.codec import Envelope, decode
from opsync.client import ApiError, OpsyncClient, Unavailable
from opsync.registry import ingestible_tables
from opsync_observatory import demo
from tests.conftest import free_port

NIGHT, SEED, OBSERVATIONS = date(2026, 11, 20), 7, 4
ARGS = ["--night", NIGHT.isoformat(), "--seed", str(SEED), "--observations", str(OBSERVATIONS)]
ALL_SCOPES = [f"{verb}:{entry.name}" for entry in ingestible_tables() for verb in ("read", "write")]


@pytest.fixture
def live_api(ingest_app):
    """The ingest API served by uvicorn on a free port, as ``make up`` serves it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(ingest_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def demo_env(live_api, issue_token, monkeypatch):
    """What ``make demo`` reads: the API's URL and a token with every table's scopes."""
    token = issue_token(ALL_SCOPES)
    monkeypatch.setenv("OPSYNC_API_URL", live_api)
    monkeypatch.setenv("OPSYNC_API_TOKEN", token)
    return live_api, token


@pytest.fixture
def buffer(redis_server):
    return Buffer(redis_server.client())


def buffered_since(buffer: Buffer, last_id: bytes) -> list[Envelope]:
    entries = buffer.client.xrange(buffer.stream, min=b"(" + last_id)
    return [decode(fields[b"txn"]) for _, fields in entries]


def last_entry(buffer: Buffer) -> bytes:
    newest = buffer.client.xrevrange(buffer.stream, count=1)
    return newest[0][0] if newest else b"0-0"


def planned_night() -> demo.Night:
    return demo.plan_night(NIGHT, SEED, OBSERVATIONS, ZoneInfo("America/Santiago"))


def test_demo_buffers_the_night_and_commits_the_planning(demo_env, buffer, primary_engine):
    url, token = demo_env
    night = planned_night()
    since = last_entry(buffer)
    with OpsyncClient(url, token) as client:
        recorder = demo.record_night(client, night, Console(file=io.StringIO()))

    planning, *writes = recorder.receipts
    assert planning.state == "committed" and planning.commit_lsn
    assert {receipt.state for receipt in writes} == {"accepted"}
    txns = buffered_since(buffer, since)
    assert [txn.txn_id for txn in txns] == [receipt.txn_id for receipt in writes]
    assert {buffer.status(txn.txn_id)["state"] for txn in txns} == {"accepted"}

    rows = Counter((step.table, step.op.value) for txn in txns for step in txn.steps)
    files = sum(len(run.files) for run in night.executions)
    assert rows == {
        ("executed_obs_unit", "insert"): OBSERVATIONS,
        ("executed_obs_unit", "update"): OBSERVATIONS,
        ("raw_data_package", "insert"): OBSERVATIONS,
        ("raw_data_package", "update"): OBSERVATIONS,
        ("raw_data_file", "insert"): files,
        ("housekeeping_sample", "insert"): 9 * 12 * 2 * 2,  # hourly batches of 5-minute samples, 2 sensors x 2 modules
    }
    assert rows == {key: count for key, count in recorder.rows.items() if key[1] != "upsert"}
    steps = [step for txn in txns for step in txn.steps]
    finished = Counter(s.values["status"] for s in steps if s.table == "executed_obs_unit" and s.op == "update")
    assert finished == {"completed": OBSERVATIONS - 1, "aborted": 1}

    opening = txns[0]
    assert [step.table for step in opening.steps] == ["executed_obs_unit", "raw_data_package"]
    assert opening.steps[1].values["executed_obs_unit_id"] == str(opening.steps[0].key)  # the $ref, resolved

    with primary_engine.connect() as conn:
        instrument = conn.execute(text("SELECT id FROM instrument WHERE name = 'CHAI'")).scalar_one()
        modules = conn.execute(text("SELECT name FROM instrument_module WHERE instrument_id = :i"), {"i": instrument})
        sources = conn.execute(text("SELECT source_name FROM obs_unit WHERE program = :p"), {"p": demo.PROGRAM})
        assert instrument == demo.instrument_id()
        assert sorted(modules.scalars()) == sorted(demo.MODULES)
        assert sorted(sources.scalars()) == sorted(source.name for source in demo.SOURCES)


def direct_rows(primary_engine) -> tuple[int, int, int]:
    with primary_engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT (SELECT count(*) FROM instrument WHERE name = 'CHAI'),"
                " (SELECT count(*) FROM instrument_module m JOIN instrument i ON i.id = m.instrument_id"
                "  WHERE i.name = 'CHAI'),"
                " (SELECT count(*) FROM obs_unit WHERE program = :p)"
            ),
            {"p": demo.PROGRAM},
        ).one()


def test_running_the_demo_twice_duplicates_nothing(demo_env, buffer, primary_engine, capsys):
    assert demo.main(ARGS) == 0
    after_first = last_entry(buffer)
    assert "transactions" in capsys.readouterr().out

    assert demo.main(ARGS) == 0
    assert buffered_since(buffer, after_first) == []  # every write of the night was answered from its Idempotency-Key
    assert direct_rows(primary_engine) == (1, len(demo.MODULES), len(demo.SOURCES))


def test_the_night_is_the_same_for_the_same_seed_and_differs_for_another():
    night = planned_night()
    other = demo.plan_night(NIGHT, SEED + 1, OBSERVATIONS, night.tz)
    assert night == planned_night()
    paths = [f.path for run in (*night.executions, *other.executions) for f in run.files]
    assert len(set(paths)) == len(paths)  # paths are unique in the primary: two seeds must not collide


RECEIPT = {
    "txn_id": "019a0000-0000-7000-8000-000000000001",
    "state": "accepted",
    "ids": ["019a0000-0000-7000-8000-000000000002"],
    "accepted_at": "2026-11-21T02:10:00+00:00",
    "status_url": "http://api/v1/transactions/019a0000-0000-7000-8000-000000000001",
}


class Script:
    """Answers requests in order from a list (a status code, or an exception to raise), recording each request."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        body = RECEIPT if answer < 400 else {"detail": [{"loc": ["body", "start_time"], "msg": "naive time"}]}
        return httpx.Response(answer, json=body)

    def keys(self) -> list[str | None]:
        return [request.headers.get("Idempotency-Key") for request in self.requests]


def client_for(script: Script, sleeps: list[float], retries: int = 3) -> OpsyncClient:
    transport = httpx.MockTransport(script)
    return OpsyncClient("http://api", "ops_token", retries=retries, backoff=0.1, transport=transport, sleep=sleeps.append)


def test_transient_failures_are_retried_with_the_same_idempotency_key():
    script, sleeps = Script(503, httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), 202), []
    with client_for(script, sleeps) as client:
        receipt = client.records("executed_obs_unit", {"status": "running"})
    assert str(receipt.id) == RECEIPT["ids"][0]
    keys = script.keys()
    assert len(keys) == 4 and len(set(keys)) == 1 and keys[0]
    assert all(json.loads(request.content) == {"status": "running"} for request in script.requests)
    assert len(sleeps) == 3 and all(0 <= delay <= 0.1 * 2**attempt for attempt, delay in enumerate(sleeps))


def test_each_logical_call_has_its_own_key_unless_given():
    script, sleeps = Script(202, 202, 202), []
    with client_for(script, sleeps) as client:
        client.update("executed_obs_unit", RECEIPT["ids"][0], {"status": "completed"})
        client.delete("raw_data_file", RECEIPT["ids"][0])
        client.transaction([{"table": "raw_data_file", "values": {}}], idempotency_key="night-1/files")
    first, second, third = script.keys()
    assert first != second and third == "night-1/files"
    assert [request.method for request in script.requests] == ["PATCH", "DELETE", "POST"]


def test_client_errors_are_raised_at_once_with_the_apis_detail():
    script, sleeps = Script(422), []
    with client_for(script, sleeps) as client, pytest.raises(ApiError) as raised:
        client.records("executed_obs_unit", {"start_time": "2026-11-21T02:00:00"})
    assert raised.value.status == 422 and raised.value.detail[0]["loc"][-1] == "start_time"
    assert len(script.requests) == 1 and sleeps == []


def test_gives_up_after_the_retries_with_the_last_failure():
    script, sleeps = Script(503, 502, 504), []
    with client_for(script, sleeps, retries=2) as client, pytest.raises(Unavailable) as raised:
        client.records("housekeeping_sample", [])
    assert raised.value.status == 504 and len(script.requests) == 3 and len(sleeps) == 2


def test_make_demo_finds_the_api_and_the_token_that_make_up_wrote(tmp_path, monkeypatch):
    for name in ("OPSYNC_API_URL", "OPSYNC_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPSYNC_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("OPSYNC_API_PORT", "18000")
    with pytest.raises(SystemExit, match="OPSYNC_API_URL"):
        demo.api_url()  # the demo itself knows no local site: make demo (devstack.demo) gives it one
    with pytest.raises(SystemExit, match="run `make up`"):
        make_demo.demo_env(StackSettings())
    (tmp_path / "secrets.json").write_text(json.dumps({"demo_token": "ops_demo"}))
    for name, value in make_demo.demo_env(StackSettings()).items():
        monkeypatch.setenv(name, value)
    assert (demo.api_url(), demo.api_token()) == ("http://127.0.0.1:18000", "ops_demo")
