"""Real services for the tests: a PostgreSQL primary with a streaming replica, and a durable Redis.

Session-scoped, on free ports in a temporary directory, built by the same ``devstack`` code
that ``make up`` uses. Tests may stop, kill and restart any of them (fault tests).
"""

import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.postgres import Credentials, PostgresServer, provision
from devstack.redis import RedisServer
from devstack.settings import StackSettings

PG_BIN = StackSettings().pg_bin
PG_OS_USER = StackSettings().pg_os_user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20, interval: float = 0.01, what: str = "condition"):
    """``predicate()``'s first true value, polled until ``timeout`` seconds have passed (then the test fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


@pytest.fixture(scope="session")
def service_root():
    """A scratch directory the unprivileged PostgreSQL user can traverse (mkdtemp makes 0700)."""
    root = Path(tempfile.mkdtemp(prefix="opsync-test-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class PostgresPair:
    primary: PostgresServer
    replica: PostgresServer


@pytest.fixture(scope="session")
def pg(service_root):
    credentials = Credentials(password=secrets.token_urlsafe(16), replication_password=secrets.token_urlsafe(16))

    def server(name: str) -> PostgresServer:
        return PostgresServer(name, service_root / name, free_port(), PG_BIN, PG_OS_USER, credentials)

    pair = PostgresPair(server("primary"), server("replica"))
    provision(pair.primary, pair.replica)
    yield pair
    for srv in (pair.replica, pair.primary):
        if srv.pid() is not None:
            srv.stop("immediate")


@pytest.fixture(scope="session")
def redis_server(service_root):
    server = RedisServer(service_root / "redis", free_port(), secrets.token_urlsafe(16))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def migrated(pg):
    """The primary's ``opsync`` database at the latest migration (and so the replica too)."""
    from opsync.migrate import upgrade

    upgrade(pg.primary.url())
    return pg


@pytest.fixture
def site_env(migrated, redis_server, monkeypatch):
    """The ``OPSYNC_*`` settings of a site wired to the test services; caches rebuilt around each test."""
    from opsync.config import get_settings

    monkeypatch.setenv("OPSYNC_PRIMARY_URL", migrated.primary.url())
    monkeypatch.setenv("OPSYNC_REPLICA_URL", migrated.replica.url())
    monkeypatch.setenv("OPSYNC_REDIS_URL", redis_server.url)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def primary_engine(site_env):
    """An engine on the test primary: direct tables and tokens."""
    from sqlalchemy import create_engine

    engine = create_engine(site_env.primary_url.get_secret_value())
    yield engine
    engine.dispose()


@pytest.fixture
def issue_token(primary_engine, site_env):
    """Issues a scoped token and returns it once the replica knows it: the API verifies tokens there."""
    import time
    import uuid

    from sqlalchemy import create_engine

    from opsync.auth import AuthError, TokenVerifier, create_token

    replica = create_engine(site_env.replica_url.get_secret_value())
    verifier = TokenVerifier(replica, ttl_s=0)

    def issue(scopes: list[str]) -> str:
        token = create_token(primary_engine, f"test-{uuid.uuid4()}", scopes)
        deadline = time.monotonic() + 10
        while True:
            try:
                verifier.verify(token)
                return token
            except AuthError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    yield issue
    replica.dispose()


@pytest.fixture
def ingest_app(site_env):
    """The ingest API app with its per-process clients rebuilt from this test's settings."""
    from ingest_api import deps
    from ingest_api.app import app

    for cached in (deps.get_redis, deps.get_buffer, deps.get_primary, deps.get_verifier):
        cached.cache_clear()
    return app


@pytest.fixture
def planning(primary_engine):
    """An instrument, a module and a planned observation in the primary (direct tables)."""
    import uuid

    from sqlalchemy import text

    ids = {k: uuid.uuid4() for k in ("instrument", "module", "obs_unit")}
    tag = uuid.uuid4().hex[:8]
    with primary_engine.begin() as conn:
        conn.execute(text("INSERT INTO instrument (id, name) VALUES (:i, :n)"), {"i": ids["instrument"], "n": f"CHAI-{tag}"})
        conn.execute(
            text("INSERT INTO instrument_module (id, instrument_id, name) VALUES (:m, :i, 'LFA')"),
            {"m": ids["module"], "i": ids["instrument"]},
        )
        conn.execute(
            text("INSERT INTO obs_unit (id, name, program, source_name, ra_deg, dec_deg) VALUES (:o, :n, 'P1', 'Orion KL', 83.8, -5.4)"),
            {"o": ids["obs_unit"], "n": f"orion-{tag}"},
        )
    return ids


@pytest.fixture
def observation(planning):
    """Values of a new executed observation of the planned one, starting now (override with kwargs)."""
    from datetime import UTC, datetime

    def values(**overrides) -> dict:
        return {
            "obs_unit_id": str(planning["obs_unit"]),
            "instrument_module_id": str(planning["module"]),
            "start_time": datetime.now(UTC).isoformat(),
        } | overrides

    return values


@pytest.fixture
def own_redis(site_env, tmp_path, monkeypatch):
    """A fresh durable Redis for this test alone (fault tests kill it, fill it, or need an empty buffer);
    the settings and the API's clients point at it."""
    from ingest_api import deps
    from opsync.config import get_settings

    tmp_path.chmod(0o755)
    server = RedisServer(tmp_path / "redis", free_port(), secrets.token_urlsafe(16))
    server.start()
    monkeypatch.setenv("OPSYNC_REDIS_URL", server.url)
    get_settings.cache_clear()
    for cached in (deps.get_redis, deps.get_buffer):
        cached.cache_clear()
    yield server
    server.stop()
    for cached in (deps.get_redis, deps.get_buffer):
        cached.cache_clear()


@pytest.fixture
def api_client(ingest_app):
    """A TestClient of the ingest API, lifespan included (it refuses a Redis that is not durable)."""
    from fastapi.testclient import TestClient

    with TestClient(ingest_app) as client:
        yield client


@pytest.fixture
def auth_headers(issue_token):
    """``auth_headers("raw_data_file", verbs=("write", "read"))``: Authorization with those scopes."""

    def headers(*tables: str, verbs=("write", "read")) -> dict:
        return {"Authorization": f"Bearer {issue_token([f'{v}:{t}' for t in tables for v in verbs])}"}

    return headers


# --- live ingest API over real HTTP (auth matrix, client) -------------------------------------------


@pytest.fixture
def live_api(ingest_app):
    """The ingest API served by uvicorn in a thread on a free port (real sockets, streams); yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    config = uvicorn.Config(ingest_app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the ingest API did not start (see the log above)")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def replica_engine(site_env):
    """An engine on the test replica, to wait until it has replayed a change."""
    from sqlalchemy import create_engine

    engine = create_engine(site_env.replica_url.get_secret_value())
    yield engine
    engine.dispose()


def pytest_collection_modifyitems(items):
    """Schemathesis (4.x under pytest 9) gives every operation of a fuzzed test the same node id: add the operation,
    so reports, ``-k`` and pytest-xdist (which tells items apart by node id) see each one."""
    for item in items:
        if item.nodeid.endswith(f"::{item.originalname}") and item.name != item.originalname:
            item._id = type(item._id).parse(item.nodeid + item.name.removeprefix(item.originalname))  # pytest 9's NodeId
