"""Security properties, checked on the real thing: tokens stored only as hashes, compared in constant
time, never logged; the read model publishes no token; the services ``make up`` starts listen only on
the configured host and want a password (see SECURITY.md).

Datasette's access rules (who may read, run SQL, write) are tested in tests/test_datasette_access.py,
the ingest API's in tests/test_auth_matrix.py.
"""

import ast
import ipaddress
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import make_url, text

from devstack.local import LocalStack
from devstack.postgres import REPLICATION_USER, SUPERUSER
from devstack.settings import StackSettings
from opsync.auth import TOKEN_PREFIX, create_token, hash_token, revoke_token
from opsync.read_model.store import ensure_read_model, layouts
from opsync.schema import ApiToken
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET_HANDLERS = ["opsync/auth.py", "opsync/tokens.py", "ingest_api/deps.py", "datasette/plugins/opsync_access.py"]
SECRET_NAMES = ("token", "secret", "digest", "password", "nonce", "sha256")


# --- tokens: hashes only, constant time, never logged -------------------------------------------------


def test_only_hashes_of_tokens_are_stored(issue_token, primary_engine, replica_engine):
    tokens = [issue_token(["admin"]), issue_token(["read:raw_data_file"])]
    assert "token" not in ApiToken.__table__.columns  # there is no column a plaintext token could go to
    for engine in (primary_engine, replica_engine):
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM api_token")).mappings().all()
        values = [str(value) for row in rows for value in row.values()]
        for token in tokens:
            secret = token.removeprefix(TOKEN_PREFIX)
            assert not [value for value in values if secret in value], "a token's secret part is stored"
            assert hash_token(token) in {row["token_sha256"] for row in rows}


def secret_comparisons(path: Path) -> list[str]:
    """``==`` / ``!=`` between values named like secrets, outside SQL ``where()`` lookups by hash."""
    tree = ast.parse(path.read_text())
    in_sql = {
        id(node)
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "where"
        for arg in call.args
        for node in ast.walk(arg)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and id(node) not in in_sql and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            source = ast.unparse(node)
            if any(name in source.lower() for name in SECRET_NAMES):
                found.append(f"{path.name}:{node.lineno}: {source}")
    return found


def test_secrets_are_compared_in_constant_time():
    """Every comparison of a secret goes through ``compare_digest``; API tokens are looked up by their hash."""
    found = [hit for name in SECRET_HANDLERS for hit in secret_comparisons(REPO / name)]
    assert found == []
    for name in ("opsync/auth.py", "datasette/plugins/opsync_access.py"):
        assert "compare_digest(" in (REPO / name).read_text(), name


LOG_CONFIG = {  # everything, from every logger, at DEBUG: SQLAlchemy's statements and parameters included
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "root": {"level": "DEBUG", "handlers": ["stderr"]},
    "loggers": {
        name: {"level": "DEBUG", "handlers": [], "propagate": True}
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "sqlalchemy.engine")
    },
}


@pytest.fixture
def debug_api(site_env, tmp_path):
    """The ingest API as a separate process, with access and debug logs on; yields (base URL, log path)."""
    config, log_path, port = tmp_path / "logging.json", tmp_path / "api.log", free_port()
    config.write_text(json.dumps(LOG_CONFIG))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "ingest_api.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-config",
                str(config),
                "--log-level",
                "debug",
                "--access-log",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OPSYNC_TOKEN_CACHE_TTL_S": "0"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        yield base, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_tokens_and_passwords_never_reach_the_logs(debug_api, issue_token, primary_engine, observation, site_env, redis_server):
    base, log_path = debug_api
    good = issue_token(["admin"])
    revoked_name = f"revoked-{uuid.uuid4()}"
    revoked = create_token(primary_engine, revoked_name, ["admin"])
    revoke_token(primary_engine, revoked_name)
    unknown = TOKEN_PREFIX + "u" * 43
    with httpx.Client(base_url=base, timeout=10) as client:

        def call(method: str, path: str, token: str, scheme: str = "Bearer", **kwargs) -> int:
            return client.request(method, path, headers={"Authorization": f"{scheme} {token}"}, **kwargs).status_code

        assert call("POST", "/v1/records/executed_obs_unit", good, json=observation()) == 202
        assert call("GET", "/v1/records/executed_obs_unit?limit=1", good) == 200
        assert call("POST", "/v1/records/executed_obs_unit", good, json={"status": 7}) == 422
        assert call("GET", f"/v1/transactions/{uuid.uuid4()}", good) == 404
        for token, scheme in ((unknown, "Bearer"), (revoked, "Bearer"), (good, "Basic"), (good + "x", "Bearer")):
            assert call("GET", "/v1/records/executed_obs_unit", token, scheme) == 401
    log = log_path.read_text()
    assert "POST /v1/records/executed_obs_unit" in log and "api_token" in log  # access and SQL logs were on
    for token in (good, revoked, unknown):
        assert token.removeprefix(TOKEN_PREFIX) not in log
    assert redis_server.password not in log
    assert make_url(site_env.primary_url.get_secret_value()).password not in log


# --- the read model ------------------------------------------------------------------------------


def test_the_read_model_has_no_token_table_or_column(tmp_path):
    path = tmp_path / "opsync.db"
    ensure_read_model(path)
    assert "api_token" not in layouts("UTC")
    with sqlite3.connect(path) as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {f"{table}.{row[1]}" for table in tables for row in conn.execute(f"PRAGMA table_info('{table}')")}
    assert not {t for t in tables if "token" in t or "ledger" in t}
    assert not {c for c in columns if "token" in c or "sha256" in c.removesuffix("checksum_sha256")}


# --- what `make up` listens on, and with which passwords -----------------------------------------


def test_make_up_binds_every_service_to_the_configured_host(tmp_path):
    """Loopback by default; whatever host is configured, no part listens anywhere else."""
    assert StackSettings.model_fields["host"].default == "127.0.0.1"
    host = "127.0.0.9"
    stack = LocalStack(StackSettings(run_dir=tmp_path / "run", host=host))
    for program in stack.programs():
        if "--host" in program.command:
            assert program.command[program.command.index("--host") + 1] == host, program.name
    commands = {p.name: p.command for p in stack.programs()}
    assert "--host" in commands["ingest-api"] and "--host" in commands["datasette"]
    assert stack.env()["AIRFLOW__API__HOST"] == host
    assert f"listen_addresses = '{host}'" in stack.primary._settings()
    stack.redis.root.mkdir(parents=True)
    stack.redis.write_config()
    config = dict(line.split(" ", 1) for line in stack.redis.conf_path.read_text().splitlines() if line)
    assert (config["bind"], config["protected-mode"]) == (host, "yes")
    assert len(config["requirepass"]) >= 32 and config["requirepass"] == stack.settings.secrets["redis_password"]
    assert oct(stack.settings.secrets_path.stat().st_mode & 0o777) == "0o600"
    assert oct(stack.redis.conf_path.stat().st_mode & 0o777) == "0o600"  # it holds the password


def listening(port: int) -> set[str]:
    """Addresses with a TCP socket listening on ``port``, from the kernel's tables."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))  # each 32-bit word is host-endian
                found.add(str(ipaddress.ip_address(raw)))
    return found


def test_redis_listens_on_loopback_only_and_wants_the_password(redis_server):
    assert listening(redis_server.port) == {"127.0.0.1"}
    with redis_server.client() as client:
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        assert client.config_get("requirepass")["requirepass"] == redis_server.password
    anonymous = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("opsync:unsent")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port, password="wrong", socket_timeout=5).ping()


def test_postgres_listens_on_loopback_only_and_wants_scram_passwords(migrated):
    for server in (migrated.primary, migrated.replica):
        assert listening(server.port) == {"127.0.0.1"}, server.name
        with server.connect() as conn:
            assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
            assert conn.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
            rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules WHERE error IS NULL").fetchall()
        assert {method for kind, method in rules if kind.startswith("host")} == {"scram-sha-256"}, rules
        assert {kind for kind, method in rules if method == "trust"} <= {"local"}  # the socket only, in a 0700 directory
        assert oct(server.root.stat().st_mode & 0o777) == "0o700"
        for user in (SUPERUSER, REPLICATION_USER):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(host=server.host, port=server.port, dbname="opsync", user=user, password="wrong", connect_timeout=5)
