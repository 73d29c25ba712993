"""What keeps the write path's latency flat at 1,000 requests per second (``make bench-ingest``):
no reference cycles per request, one replica read per token at a time and ahead of expiry, a
backpressure verdict that never makes a request wait while it is re-measured, commands packed
in C. Real app, real Redis, real replica; requests are driven straight through ASGI, so nothing
but the app allocates."""

import asyncio
import gc
import json
import time
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import insert, text

from ingest_api import deps
from ingest_api.backpressure import STALE_PERIODS
from opsync.auth import hash_token, revoke_token
from opsync.config import get_settings
from opsync_observatory.models import Instrument, InstrumentModule

TABLE = "housekeeping_sample"
PATH = f"/v1/records/{TABLE}"


async def post(app, body: dict, token: str) -> int:
    """One POST through the app's ASGI interface, as uvicorn makes it; returns the status."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages = iter([{"type": "http.request", "body": raw, "more_body": False}])
    status = []

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


@pytest.fixture
def sample(primary_engine):
    """Valid housekeeping samples of one module (a direct table's row, in the primary)."""
    with primary_engine.begin() as conn:
        instrument = conn.execute(insert(Instrument).values(name=f"HOT-{uuid.uuid4().hex[:8]}").returning(Instrument.id)).scalar_one()
        module = conn.execute(
            insert(InstrumentModule).values(instrument_id=instrument, name="LFA").returning(InstrumentModule.id)
        ).scalar_one()
    count = iter(range(10**9))

    def body() -> dict:
        return {
            "instrument_module_id": str(module),
            "sensor": "mixer",
            "value": 4.2,
            "unit": "K",
            "sampled_at": f"2026-11-22T03:00:00.{next(count) % 10**6:06d}+00:00",
        }

    return body


@pytest.fixture
def write_token(issue_token):
    return issue_token([f"write:{TABLE}"])


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_write_leaves_no_cyclic_garbage(ingest_app, sample, write_token):
    """Cyclic garbage is freed only by the collector: one cycle per request (a recursive closure did it)
    made each worker stop for a collection every few thousand requests, for up to 17 ms."""

    async def writes() -> int:
        async with ingest_app.router.lifespan_context(ingest_app):
            assert await post(ingest_app, sample(), write_token) == 202  # caches filled, scripts loaded
            gc.collect()
            gc.disable()
            try:
                statuses = [await post(ingest_app, sample(), write_token) for _ in range(200)]
                found = gc.collect()
            finally:
                gc.enable()
            assert statuses == [202] * 200
            return found

    found = run(writes())
    # Less than one cyclic object per request (a cycle is several); other tests' threads winding down may add a few
    assert found < 200, f"the write path creates reference cycles: {found} objects in 200 requests"


def test_concurrent_requests_with_an_uncached_token_read_it_once(ingest_app, sample, write_token, monkeypatch):
    verifier = deps.get_verifier()
    reads = []
    fetch = verifier._fetch
    monkeypatch.setattr(verifier, "_fetch", lambda digest: reads.append(digest) or fetch(digest))

    async def burst() -> list[int]:
        async with ingest_app.router.lifespan_context(ingest_app):
            return await asyncio.gather(*(post(ingest_app, sample(), write_token) for _ in range(30)))

    assert run(burst()) == [202] * 30
    assert reads == [hash_token(write_token)], "each request read the token's row itself"


def test_a_token_is_reread_before_its_cache_entry_expires(ingest_app, sample, write_token, primary_engine, replica_engine):
    """Past half its TTL a token's entry still answers, and its row is re-read meanwhile: a revocation
    shows while the entry would still have been trusted, and no request waited for the replica."""
    verifier = deps.get_verifier()
    verifier.ttl_s = 60
    digest = hash_token(write_token)

    async def scenario() -> tuple[list[int], float]:
        async with ingest_app.router.lifespan_context(ingest_app):
            assert await post(ingest_app, sample(), write_token) == 202
            with primary_engine.connect() as conn:
                name = conn.execute(text("SELECT name FROM api_token WHERE token_sha256 = :h"), {"h": digest}).scalar_one()
            assert revoke_token(primary_engine, name)
            deadline = time.monotonic() + 10
            while not replica_revoked():
                assert time.monotonic() < deadline, "the replica did not replay the revocation"
                await asyncio.sleep(0.02)
            assert await post(ingest_app, sample(), write_token) == 202, "the entry is fresh: trusted"
            verifier._cache[digest] = replace(verifier._cache[digest], fetched=time.monotonic() - 40)  # past half its TTL
            started, statuses = time.monotonic(), []
            while 401 not in statuses and time.monotonic() - started < 10:
                statuses.append(await post(ingest_app, sample(), write_token))
                await asyncio.sleep(0.01)
            return statuses, time.monotonic() - started

    def replica_revoked() -> bool:
        with replica_engine.connect() as conn:
            return conn.execute(text("SELECT revoked_at IS NOT NULL FROM api_token WHERE token_sha256 = :h"), {"h": digest}).scalar()

    statuses, took = run(scenario())
    assert statuses[0] == 202, "the first request past half the TTL waited for the replica"
    assert statuses[-1] == 401 and took < 5, f"the revocation was not picked up ahead of expiry: {statuses}"


def test_the_backpressure_verdict_is_remeasured_while_the_old_one_answers(ingest_app, sample, write_token, own_redis, monkeypatch):
    period = 0.25
    monkeypatch.setenv("OPSYNC_HIGH_WATER_ENTRIES", "2")
    monkeypatch.setenv("OPSYNC_BACKPRESSURE_CACHE_S", str(period))
    get_settings.cache_clear()
    redis = own_redis.client()

    async def scenario() -> None:
        async with ingest_app.router.lifespan_context(ingest_app):
            assert [await post(ingest_app, sample(), write_token) for _ in range(2)] == [202, 202]  # measured empty
            await asyncio.sleep(period * 1.2)
            assert await post(ingest_app, sample(), write_token) == 202, "a stale verdict must answer at once"
            deadline = time.monotonic() + 5
            while await post(ingest_app, sample(), write_token) != 503:  # the new measurement: 3 unsent
                assert time.monotonic() < deadline, "the stale verdict was never re-measured"
                await asyncio.sleep(0.01)
            redis.set("opsync:unsent", 0)  # as if drained
            await asyncio.sleep(period * (STALE_PERIODS + 0.5))
            assert await post(ingest_app, sample(), write_token) == 202, "a verdict too old to trust must be waited for"

    run(scenario())


def test_writes_go_on_after_the_scripts_are_flushed(ingest_app, sample, write_token, redis_server):
    """The asyncio client's C packer splits ``SCRIPT LOAD``, which redis-py sends after ``NOSCRIPT``."""

    async def scenario() -> list[int]:
        async with ingest_app.router.lifespan_context(ingest_app):
            first = await post(ingest_app, sample(), write_token)
            redis_server.client().script_flush()
            return [first, await post(ingest_app, sample(), write_token)]

    assert run(scenario()) == [202, 202]


def test_a_worker_connects_before_its_first_request(ingest_app, redis_server):
    """Its first write would otherwise connect to Redis, load the script and set up the replica's engine
    while it waits (a fresh worker's loop stopped for 50 ms in ``make bench-ingest``)."""
    redis_server.client().script_flush()

    async def started() -> tuple[int, list[bool]]:
        async with ingest_app.router.lifespan_context(ingest_app):
            client = deps.get_enqueuer().client
            idle_connections = len(client.connection_pool._available_connections)
            return idle_connections, await client.script_exists(deps.get_enqueuer()._enqueue.sha)

    assert run(started()) == (1, [True])
    assert deps.get_verifier().engine.pool.checkedin() == 1


def test_a_worker_starts_while_the_replica_and_redis_are_unreachable(ingest_app, monkeypatch, caplog):
    """Writes then answer 503 or 401 until they are back; the API still starts."""
    monkeypatch.setenv("OPSYNC_REPLICA_URL", "postgresql+psycopg://opsync:x@127.0.0.1:9/opsync")
    monkeypatch.setenv("OPSYNC_REDIS_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("OPSYNC_ALLOW_NON_DURABLE", "1")
    get_settings.cache_clear()
    for cached in (deps.get_redis, deps.get_buffer, deps.get_verifier):
        cached.cache_clear()

    async def started() -> None:
        async with ingest_app.router.lifespan_context(ingest_app):
            pass

    started_at = time.monotonic()
    run(started())
    assert time.monotonic() - started_at < 5
    assert "site buffer unreachable at start (ConnectionError)" in caplog.text
    assert "token store unreachable at start (OperationalError)" in caplog.text
