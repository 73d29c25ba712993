"""`make up` brings the whole site up on this machine; `make down` stops it losing nothing.

Runs the real commands in a temporary run dir on free ports, so it never touches a developer's
own `.run/` stack.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from opsync.stack.settings import REPO
from tests.conftest import free_port

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack_env():
    run_dir = Path(tempfile.mkdtemp(prefix="opsync-stack-"))
    env = {
        **os.environ,
        "OPSYNC_RUN_DIR": str(run_dir),
        **{
            f"OPSYNC_{name.upper()}_PORT": str(free_port())
            for name in ("primary", "replica", "redis", "api", "datasette", "airflow")
        },
    }
    yield env
    make("down", env, check=False)
    subprocess.run(["rm", "-rf", str(run_dir)], check=False)


def make(target: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "-s", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        log_dir = Path(env["OPSYNC_RUN_DIR"]) / "logs"
        logs = {p.name: p.read_text()[-2000:] for p in log_dir.glob("*.log")} if log_dir.exists() else {}
        pytest.fail(f"make {target} failed:\n{proc.stdout}\n{proc.stderr}\n{logs}")
    return proc


def secrets_of(env: dict) -> dict:
    import json

    return json.loads((Path(env["OPSYNC_RUN_DIR"]) / "secrets.json").read_text())


def conninfo(env: dict, which: str) -> str:
    return psycopg.conninfo.make_conninfo(
        host="127.0.0.1", port=env[f"OPSYNC_{which}_PORT"], dbname="opsync", user="opsync",
        password=secrets_of(env)["pg_password"],
    )


def redis_client(env: dict) -> redis.Redis:
    return redis.Redis(port=int(env["OPSYNC_REDIS_PORT"]), password=secrets_of(env)["redis_password"])


def test_make_up_starts_every_part_and_make_down_keeps_the_buffer(stack_env):
    env = stack_env
    out = make("up", env).stdout
    assert "opsync is up" in out
    for name in ("API", "DATASETTE", "AIRFLOW"):
        assert f"127.0.0.1:{env[f'OPSYNC_{name}_PORT']}" in out
    assert secrets_of(env)["airflow_admin_password"] in out

    api = f"http://127.0.0.1:{env['OPSYNC_API_PORT']}"
    assert httpx.get(f"{api}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{api}/readyz").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{env['OPSYNC_DATASETTE_PORT']}/-/versions.json").status_code == 200
    airflow_health = httpx.get(f"http://127.0.0.1:{env['OPSYNC_AIRFLOW_PORT']}/api/v2/monitor/health").json()
    assert {airflow_health[c]["status"] for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")} == {"healthy"}
    with psycopg.connect(conninfo(env, "PRIMARY")) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    with psycopg.connect(conninfo(env, "REPLICA")) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    client = redis_client(env)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    entry = client.xadd("stack-probe", {"record": "kept across make down"})
    assert_records_travel_to_the_replica(api, f"http://127.0.0.1:{env['OPSYNC_DATASETTE_PORT']}", secrets_of(env)["demo_token"])
    assert make("status", env).returncode == 0

    make("down", env)
    with pytest.raises(redis.ConnectionError):
        redis_client(env).ping()
    not_running = subprocess.run(
        [sys.executable, "-m", "opsync.stack.cli", "status"], env=env, capture_output=True, text=True
    )
    assert not_running.returncode == 3, not_running.stdout

    make("up", env)
    assert [e[0] for e in redis_client(env).xrange("stack-probe")] == [entry]
    make("down", env)


def assert_records_travel_to_the_replica(api: str, datasette: str, token: str) -> None:
    """The whole chain under the real scheduler and triggerer: 202, shown in Datasette as buffered, drained,
    the sensor deferred and woken, replicated, and shown so in Datasette by the publisher running inside it."""
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        instrument = client.post("/v1/records/instrument", json={"name": "STACK"}).json()["ids"][0]
        module = client.post("/v1/records/instrument_module", json={"instrument_id": instrument, "name": "M1"}).json()["ids"][0]
        sample = {"instrument_module_id": module, "sensor": "stack_probe", "sampled_at": "2026-11-21T03:00:00Z", "value": 1.0}
        accepted = client.post("/v1/records/housekeeping_sample", json=sample)
        assert accepted.status_code == 202, accepted.text
        row = f"{datasette}/opsync/housekeeping_sample/{accepted.json()['ids'][0]}.json?_shape=objects"
        seen = [wait_for_sync_state(row, {"buffered", "committed", "replicated"}, 30)]
        status_url = accepted.json()["status_url"]
        deadline = time.monotonic() + 120
        while (state := client.get(status_url).json()["state"]) != "replicated":
            assert state in ("accepted", "committed") and time.monotonic() < deadline, state
            time.sleep(1)
        seen.append(wait_for_sync_state(row, {"replicated"}, 30))
    assert seen[-1] == "replicated"


def wait_for_sync_state(row_url: str, states: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(row_url, timeout=10)
        rows = response.json().get("rows", []) if response.status_code == 200 else []
        if rows and rows[0]["_sync_state"] in states:
            return rows[0]["_sync_state"]
        assert time.monotonic() < deadline, (response.status_code, response.text[:300])
        time.sleep(0.2)
