"""``opsync tokens create|list|revoke`` against the real primary, and the issued token against the API."""

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from opsync.auth import AuthError, TokenVerifier, create_token, hash_token
from opsync.cli import main
from opsync.schema import ApiToken

T = "executed_obs_unit"
OPSYNC = Path(sys.executable).with_name("opsync")  # the installed entry point of this venv


@pytest.fixture
def cli(site_env):
    """``cli(*args)``: run ``opsync`` in-process with this test's settings; stdout and stderr apart."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return run


def new_name() -> str:
    return f"cli-{uuid.uuid4()}"


def stored(engine, name: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(ApiToken.__table__).where(ApiToken.name == name)).first()
    return dict(row._mapping) if row else None


def wait_until_valid_at_site(site_env, token: str) -> None:
    """The API checks tokens on the replica: wait until it has replayed the new one."""
    replica = create_engine(site_env.replica_url.get_secret_value())
    verifier = TokenVerifier(replica, ttl_s=0)
    deadline = time.monotonic() + 15
    try:
        while True:
            try:
                verifier.verify(token)
                return
            except AuthError:
                assert time.monotonic() < deadline, "the replica never knew the token"
                time.sleep(0.05)
    finally:
        replica.dispose()


def test_create_prints_the_token_once_and_stores_only_its_hash(cli, primary_engine):
    name = new_name()
    result = cli("tokens", "create", name, "--scope", f"write:{T}", "--scope", f"read:{T}", "--scope", f"write:{T}")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # the data, and only it, on stdout
    assert token.startswith("ops_") and len(token) >= 4 + 43  # 256 bits, base64url
    assert token not in result.stderr and "store it now" in result.stderr
    row = stored(primary_engine, name)
    assert row["token_sha256"] == hash_token(token)
    assert token not in repr(row)
    assert row["scopes"] == [f"write:{T}", f"read:{T}"]  # repeated scope kept once, in order
    assert row["expires_at"] is None and row["revoked_at"] is None


def test_created_token_works_against_the_api(cli, site_env, ingest_app, observation):
    result = cli("tokens", "create", new_name(), "--scope", f"write:{T}")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    wait_until_valid_at_site(site_env, token)
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(ingest_app) as api:
        written = api.post(f"/v1/records/{T}", json=observation(), headers=headers)
        assert written.status_code == 202, written.text
        assert api.get(f"/v1/records/{T}", headers=headers).status_code == 403  # write only, as issued


def test_create_json(cli, primary_engine):
    name = new_name()
    result = cli("tokens", "create", name, "--scope", "admin", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == {"name": name, "token": data["token"], "scopes": ["admin"], "expires_at": None}
    assert stored(primary_engine, name)["token_sha256"] == hash_token(data["token"])


@pytest.mark.parametrize(
    "expires, expected",
    [
        ("90d", None),  # relative: checked against the clock below
        ("2031-05-01", datetime(2031, 5, 1, tzinfo=UTC)),
        ("2031-05-01T12:00+02:00", datetime(2031, 5, 1, 10, tzinfo=UTC)),
        ("2031-05-01T12:00:30Z", datetime(2031, 5, 1, 12, 0, 30, tzinfo=UTC)),
    ],
)
def test_create_with_expiry(cli, primary_engine, expires, expected):
    name = new_name()
    before = datetime.now(UTC)
    result = cli("tokens", "create", name, "--scope", f"read:{T}", "--expires", expires, "--json")
    assert result.exit_code == 0, result.output
    if expected is None:
        expected = before + timedelta(days=90)
        assert expected <= datetime.fromisoformat(json.loads(result.stdout)["expires_at"]) <= datetime.now(UTC) + timedelta(days=90)
        assert abs(stored(primary_engine, name)["expires_at"] - expected) < timedelta(minutes=1)
        return
    assert datetime.fromisoformat(json.loads(result.stdout)["expires_at"]) == expected
    assert stored(primary_engine, name)["expires_at"] == expected


@pytest.mark.parametrize(
    "expires, words",
    [
        ("2031-05-01T12:00", "no UTC offset"),  # naive: whose noon?
        ("2020-01-01", "not in the future"),
        ("2020-01-01T00:00Z", "not in the future"),
        ("0d", "not in the future"),
        ("tomorrow", "expected e.g. 90d"),
        ("99999999999d", "too far in the future"),  # past datetime's range
    ],
)
def test_create_refuses_a_bad_expiry(cli, primary_engine, expires, words):
    name = new_name()
    result = cli("tokens", "create", name, "--scope", f"read:{T}", "--expires", expires)
    assert result.exit_code == 2, result.output
    assert words in result.stderr
    assert result.stdout == "" and stored(primary_engine, name) is None


@pytest.mark.parametrize("scope", [f"write:{T}s", f"wirte:{T}", "root", "read:", "admin:all"])
def test_misspelt_scope_is_refused_listing_the_valid_ones(cli, primary_engine, scope):
    name = new_name()
    result = cli("tokens", "create", name, "--scope", f"read:{T}", "--scope", scope)
    assert result.exit_code == 2, result.output
    assert scope in result.stderr
    for valid in ("admin", "read:TABLE", "write:TABLE", T, "raw_data_file", "housekeeping_sample"):
        assert valid in result.stderr
    assert stored(primary_engine, name) is None


def test_duplicate_name_exits_6_and_keeps_the_first_token(cli, primary_engine):
    name = new_name()
    first = cli("tokens", "create", name, "--scope", f"read:{T}")
    assert first.exit_code == 0
    again = cli("tokens", "create", name, "--scope", "admin")
    assert again.exit_code == 6, again.output
    assert "exists already" in again.stderr and again.stdout == ""
    row = stored(primary_engine, name)
    assert row["token_sha256"] == hash_token(first.stdout.strip()) and row["scopes"] == [f"read:{T}"]


def test_revoke_unknown_exits_4(cli):
    result = cli("tokens", "revoke", new_name())
    assert result.exit_code == 4, result.output
    assert "no token named" in result.stderr


def test_revoke_twice_succeeds_and_says_nothing_changed(cli, primary_engine):
    name = new_name()
    assert cli("tokens", "create", name, "--scope", f"read:{T}").exit_code == 0
    first = cli("tokens", "revoke", name, "--json")
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert (data["name"], data["state"], data["changed"]) == (name, "revoked", True)
    revoked_at = stored(primary_engine, name)["revoked_at"]
    assert revoked_at is not None
    second = cli("tokens", "revoke", name, "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["changed"] is False and "already revoked" in second.stderr
    assert stored(primary_engine, name)["revoked_at"] == revoked_at  # the first revocation's time stands
    human = cli("tokens", "revoke", name)
    assert human.exit_code == 0 and human.stdout == ""


def test_list_shows_states_and_never_the_hash(cli, primary_engine):
    names = {state: f"list-{state}-{uuid.uuid4()}" for state in ("active", "expired", "revoked")}
    tokens = {
        "active": create_token(primary_engine, names["active"], [f"read:{T}"], datetime.now(UTC) + timedelta(days=1)),
        "expired": create_token(primary_engine, names["expired"], [f"read:{T}"], datetime.now(UTC) + timedelta(seconds=1)),
        "revoked": create_token(primary_engine, names["revoked"], ["admin"]),
    }
    assert cli("tokens", "revoke", names["revoked"]).exit_code == 0
    time.sleep(1.1)
    result = cli("tokens", "list", "--json")
    assert result.exit_code == 0, result.output
    listed = {info["name"]: info for info in json.loads(result.stdout)}
    for state, name in names.items():
        assert listed[name]["state"] == state
        assert set(listed[name]) == {"name", "scopes", "state", "created_at", "expires_at", "revoked_at", "last_used_at"}
    human = cli("tokens", "list")  # piped, as to grep: one whole line per token, whatever the width
    assert human.exit_code == 0, human.output
    lines = {name: next(line for line in human.stdout.splitlines() if name in line) for name in names.values()}
    for state, name in names.items():
        assert f" {state} " in lines[name]
    for output in (result.stdout, human.stdout):
        for token in tokens.values():
            assert token not in output and hash_token(token) not in output


@pytest.mark.parametrize("args", [("create", "x", "--scope", "admin"), ("list",), ("revoke", "x")])
def test_unreachable_primary_is_one_clear_line_without_the_password(cli, monkeypatch, args):
    from conftest import free_port

    from opsync.config import get_settings

    password = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPSYNC_PRIMARY_URL", f"postgresql+psycopg://opsync:{password}@127.0.0.1:{free_port()}/opsync")
    get_settings.cache_clear()
    result = cli("tokens", *args)
    assert result.exit_code == 5, result.output  # unavailable: try again later
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: cannot reach the primary")
    assert "***" in result.stderr and password not in result.output


def test_installed_script(site_env, primary_engine):
    """The ``opsync`` entry point of the venv, as an operator runs it."""
    env = {**os.environ, "OPSYNC_PRIMARY_URL": site_env.primary_url.get_secret_value()}
    name = new_name()
    created = subprocess.run(
        [str(OPSYNC), "tokens", "create", name, "--scope", f"write:{T}", "--expires", "30d", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    assert stored(primary_engine, name)["token_sha256"] == hash_token(token)
    assert token not in created.stderr
    bad = subprocess.run([str(OPSYNC), "tokens", "revoke", new_name()], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 4 and "no token named" in bad.stderr
