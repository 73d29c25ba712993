"""`make up` brings the whole site up on this machine; `make down` stops it losing nothing.

Runs the real commands in a temporary run dir on free ports, so it never touches a developer's
own `.run/` stack.
"""

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis
from alembic.script import ScriptDirectory

from devstack.faults import TASK_TITLE, normal
from devstack.settings import REPO
from opsync.lsn import Lsn
from opsync.migrate import alembic_config
from tests.conftest import free_port

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack_env():
    run_dir = Path(tempfile.mkdtemp(prefix="opsync-stack-"))
    env = {
        **os.environ,
        "OPSYNC_RUN_DIR": str(run_dir),
        **{f"OPSYNC_{name.upper()}_PORT": str(free_port()) for name in ("primary", "replica", "redis", "api", "datasette", "airflow")},
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


def migration_heads() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_heads())


def secrets_of(env: dict) -> dict:
    import json

    return json.loads((Path(env["OPSYNC_RUN_DIR"]) / "secrets.json").read_text())


def conninfo(env: dict, which: str) -> str:
    return psycopg.conninfo.make_conninfo(
        host="127.0.0.1",
        port=env[f"OPSYNC_{which}_PORT"],
        dbname="opsync",
        user="opsync",
        password=secrets_of(env)["pg_password"],
    )


def redis_client(env: dict) -> redis.Redis:
    return redis.Redis(port=int(env["OPSYNC_REDIS_PORT"]), password=secrets_of(env)["redis_password"])


REPLICA_TRIGGER = "opsync_airflow.triggers.ReplicaLsnTrigger"
WAIT_TASK = "wait_for_replica"


def test_wait_for_replica_waits_deferred_in_the_triggerer_holding_no_slot(stack_env):
    """Replay paused: the run that drained the records leaves ``wait_for_replica`` deferred to a live triggerer, with
    no task process and no pool slot held for it; replay resumed: the transactions are replicated, the task succeeds.

    First in the module so it shares the cold ``make up`` of the test below; in any other order its own ``make up``
    starts the site (and the module's fixture stops it)."""
    env = stack_env
    make("up", env)
    with ingest_client(env) as ingest, airflow_client(env) as airflow:
        module = new_module(ingest, f"DEFER-{time.time_ns()}")  # instrument names are unique
        with replay_paused(env):
            status_urls = [post_sample(ingest, module, f"defer_{n}") for n in range(3)]
            commit_lsn = poll(lambda: first_commit_lsn(ingest, status_urls), 60, "a transaction committed while replay is paused")
            ti = poll(lambda: deferred_wait(airflow, commit_lsn), 60, f"{WAIT_TASK} deferred to a triggerer for {commit_lsn}")
            assert ti["trigger"]["classpath"] == REPLICA_TRIGGER, ti["trigger"]
            assert ti["triggerer_job"]["job_type"] == "TriggererJob" and ti["triggerer_job"]["state"] == "running", ti["triggerer_job"]
            # The task's process reports `deferred` and then exits: give it a moment, then it must be gone.
            poll(
                lambda: not task_processes(ti["id"]) and not psutil.pid_exists(ti["pid"]),
                30,
                f"the deferred task's process {ti['pid']} to exit",
            )
            idle = f"{ti['pool']} with no slot running while {WAIT_TASK} is deferred"
            pool = poll(lambda: idle_pool_while_deferred(airflow, ti), 30, idle)
            assert pool["include_deferred"] is False and pool["deferred_slots"] >= 1, pool
        for url in status_urls:
            poll(lambda url=url: ingest.get(url).json()["state"] == "replicated", 60, f"{url} replicated after replay resumed")
        poll(lambda: task_instance(airflow, ti)["state"] == "success", 60, f"{WAIT_TASK} of {ti['dag_run_id']} success")


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
        applied = {version for (version,) in conn.execute("SELECT version_num FROM alembic_version")}
    assert applied == migration_heads()  # the engine's branch and the domain's, each at its head
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
    not_running = subprocess.run([sys.executable, "-m", "devstack.cli", "status"], env=env, capture_output=True, text=True)
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


def ingest_client(env: dict) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{env['OPSYNC_API_PORT']}",
        headers={"Authorization": f"Bearer {secrets_of(env)['demo_token']}"},
        timeout=10,
    )


def airflow_client(env: dict) -> httpx.Client:
    """Airflow's REST API as the site's admin (a JWT from the simple auth manager's ``/auth/token``)."""
    base_url = f"http://127.0.0.1:{env['OPSYNC_AIRFLOW_PORT']}"
    login = httpx.post(
        f"{base_url}/auth/token", json={"username": "admin", "password": secrets_of(env)["airflow_admin_password"]}, timeout=10
    )
    assert login.status_code == 201, login.text
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {login.json()['access_token']}"}, timeout=10)


@contextmanager
def replay_paused(env: dict):
    """The replica receives WAL but replays none of it; resumed on a fresh connection whatever happened meanwhile."""
    with psycopg.connect(conninfo(env, "REPLICA"), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        with psycopg.connect(conninfo(env, "REPLICA"), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")


def new_module(ingest: httpx.Client, name: str) -> str:
    """An instrument and its module (direct tables: written straight to the primary), for samples to refer to."""
    instrument = ingest.post("/v1/records/instrument", json={"name": name}).json()["ids"][0]
    return ingest.post("/v1/records/instrument_module", json={"instrument_id": instrument, "name": "M1"}).json()["ids"][0]


def post_sample(ingest: httpx.Client, module: str, sensor: str) -> str:
    """A buffered (critical) record: the drain, not the API, takes it to the primary. Returns its status URL."""
    sample = {"instrument_module_id": module, "sensor": sensor, "sampled_at": "2026-11-21T03:00:00Z", "value": 1.0}
    accepted = ingest.post("/v1/records/housekeeping_sample", json=sample)
    assert accepted.status_code == 202 and accepted.json()["state"] == "accepted", accepted.text
    return accepted.json()["status_url"]


def first_commit_lsn(ingest: httpx.Client, status_urls: list[str]) -> Lsn | None:
    """The lowest commit LSN among the transactions drained so far (replay is paused: none may be replicated)."""
    states = [ingest.get(url).json() for url in status_urls]
    assert all(s["state"] in ("accepted", "committed") for s in states), states
    lsns = [Lsn.parse(s["commit_lsn"]) for s in states if s["state"] == "committed"]
    return min(lsns, default=None)


def deferred_wait(airflow: httpx.Client, commit_lsn: Lsn) -> dict | None:
    """The deferred ``wait_for_replica`` waiting for ``commit_lsn`` or later, once a triggerer has taken its trigger."""
    response = airflow.get("/api/v2/dags/opsync_drain/dagRuns/~/taskInstances", params={"task_id": WAIT_TASK, "state": "deferred"})
    assert response.status_code == 200, response.text
    for ti in response.json()["task_instances"]:
        if Lsn.parse(ti["rendered_fields"]["target_lsn"]) >= commit_lsn and (ti["trigger"] or {}).get("triggerer_id"):
            return ti
    return None


def task_instance(airflow: httpx.Client, ti: dict) -> dict:
    response = airflow.get(f"/api/v2/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}")
    assert response.status_code == 200, response.text
    return response.json()


def idle_pool_while_deferred(airflow: httpx.Client, ti: dict) -> dict | None:
    """The task's pool at a moment when nothing runs in it and ``ti`` is still deferred (polled before and after, so
    the pool's figures fall inside the deferral); other DAGs' tasks come and go, so this may take a few polls."""
    assert task_instance(airflow, ti)["state"] == "deferred"
    pool = airflow.get(f"/api/v2/pools/{ti['pool']}").json()
    assert pool["occupied_slots"] == pool["running_slots"] + pool["queued_slots"], pool  # deferred tasks not counted
    assert task_instance(airflow, ti)["state"] == "deferred"
    return pool if pool["running_slots"] == 0 and pool["deferred_slots"] >= 1 else None


def task_processes(ti_id: str) -> list[psutil.Process]:
    """Processes running task instance ``ti_id``, found by the title Airflow gives a task's process."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith(TASK_TITLE) and normal(title[len(TASK_TITLE) :]) == normal(ti_id):
            found.append(proc)
    return found


def poll(check: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.5):
    """``check()``'s first truthy answer; fails naming ``what`` after ``timeout_s`` (generous: a busy 2-core machine)."""
    deadline = time.monotonic() + timeout_s
    while not (answer := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(every_s)
    return answer
