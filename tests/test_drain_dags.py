"""The drain and reconcile DAGs, run with ``dag.test()`` against the real Redis, primary and streaming replica.

Each test has a Redis of its own (``own_redis``), so a buffer holds only what the test put there.
``dag.test()`` runs triggers inline; the trigger tests below show the triggerer can import and run them.
"""

from tests.airflow_home import configure_airflow, migrate

AIRFLOW_HOME = configure_airflow()

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402
from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from devstack.settings import REPO  # noqa: E402
from opsync.buffer import Buffer  # noqa: E402
from opsync.buffer.figures import buffer_stats  # noqa: E402
from opsync.lsn import Lsn, current_position, replica_position  # noqa: E402
from opsync_airflow.hooks import REPLICA_CONN_ID, SiteBufferHook, SiteDatabaseHook  # noqa: E402
from opsync_airflow.triggers import BufferWakeTrigger, ReplicaLsnTrigger  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.tls import tls_redis  # noqa: E402


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=REPO / "dags", safe_mode=False)


@pytest.fixture
def site(migrated, own_redis, monkeypatch):
    """Airflow's connections point at this test's Redis and the test databases, as ``make up`` sets them."""
    migrate()
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", own_redis.url)
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_PRIMARY", migrated.primary.url(driver="postgresql"))
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_REPLICA", migrated.replica.url(driver="postgresql"))
    return Buffer(own_redis.client())


@pytest.fixture
def post(api_client, auth_headers, observation):
    """POST ``n`` executed observations through the ingest API; returns (txn_id, row id) pairs."""
    headers = auth_headers("executed_obs_unit")

    def post(n: int = 1) -> list[tuple[str, str]]:
        answers = [api_client.post("/v1/records/executed_obs_unit", json=observation(), headers=headers) for _ in range(n)]
        assert {a.status_code for a in answers} == {202}
        return [(a.json()["txn_id"], a.json()["ids"][0]) for a in answers]

    return post


def states(buffer: Buffer, posted) -> list[str]:
    return [s["state"] for s in buffer.statuses([txn for txn, _ in posted])]


def rows(url: str, posted) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM executed_obs_unit WHERE id = ANY(:ids)"), {"ids": [key for _, key in posted]}
            ).scalar()
    finally:
        engine.dispose()


def task_states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def test_posted_records_are_drained_replicated_and_confirmed(site, post, migrated, dagbag, capsys):
    posted = post(5)

    run = dagbag.get_dag("opsync_drain").test()

    assert run.state == "success", task_states(run)
    assert states(site, posted) == ["replicated"] * 5
    assert rows(migrated.primary.url(), posted) == 5 and rows(migrated.replica.url(), posted) == 5
    log = capsys.readouterr().out
    assert "5 applied, 0 already applied (skipped), 0 dead-lettered in 1 batches" in log
    assert "5 confirmed replicated, 0 still await the replica" in log
    stats = buffer_stats(site.client, site)
    assert (stats.depth, stats.awaiting_replica, stats.dead_letters) == (0, 0, 0)


def test_a_run_with_nothing_to_do_is_quick_and_says_so(site, dagbag, capsys):
    dag = dagbag.get_dag("opsync_drain")
    dag.test()  # the first dag.test() of a session pays Airflow's start-up
    capsys.readouterr()

    started = time.monotonic()
    run = dag.test()
    elapsed = time.monotonic() - started

    assert run.state == "success" and elapsed < 15, elapsed  # generous: what it rules out is a sensor wait or a retry delay
    log = capsys.readouterr().out
    assert "nothing to drain: the buffer is empty" in log
    assert "nothing committed by this run: no replica position to wait for" in log
    assert "nothing awaits the replica" in log
    assert "XCom not found" not in log


def test_a_stopped_primary_fails_the_drain_plainly_and_keeps_everything_buffered(site, post, migrated, dagbag, monkeypatch, capsys):
    posted = post(3)
    dag = dagbag.get_dag("opsync_drain")
    drain = dag.get_task("drain")
    assert drain.retries >= 3 and drain.retry_exponential_backoff and drain.max_retry_delay
    monkeypatch.setattr(drain, "retries", 0)  # dag.test() would sit out the backoff

    migrated.primary.stop()
    try:
        run = dag.test()
    finally:
        migrated.primary.start()

    assert run.state == "failed"
    assert task_states(run) == {"drain": "failed", "wait_for_replica": "upstream_failed", "confirm": "upstream_failed"}
    log = capsys.readouterr().out
    assert "primary unreachable: " in log and "entries stay buffered (3 waiting); retrying with backoff" in log
    stats = buffer_stats(site.client, site)
    assert (stats.depth, stats.dead_letters, stats.awaiting_replica) == (3, 0, 0)
    assert states(site, posted) == ["accepted"] * 3

    assert dag.test().state == "success"  # the primary is back: the backlog drains
    assert states(site, posted) == ["replicated"] * 3


def test_the_sensor_defers_while_the_replica_is_down_and_confirms_when_it_returns(site, post, migrated, dagbag, capsys):
    posted = post(2)
    migrated.replica.stop()

    def start_replica_once_the_sensor_waits():
        deadline = time.monotonic() + 60
        while states(site, posted) != ["committed"] * 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2)
        migrated.replica.start()

    restart = threading.Thread(target=start_replica_once_the_sensor_waits)
    restart.start()
    try:
        run = dagbag.get_dag("opsync_drain").test()
    finally:
        restart.join()

    assert run.state == "success", task_states(run)
    assert states(site, posted) == ["replicated"] * 2
    log = capsys.readouterr().out
    assert "replica unreachable" in log and "replica replayed " in log


def wait_for_replay(migrated, timeout: float = 10) -> None:
    primary, replica = create_engine(migrated.primary.url()), create_engine(migrated.replica.url())
    try:
        target, deadline = current_position(primary), time.monotonic() + timeout
        while replica_position(replica) < target:
            assert time.monotonic() < deadline, "the replica did not replay in time"
            time.sleep(0.05)
    finally:
        primary.dispose()
        replica.dispose()


def test_reconcile_on_a_new_site_finds_nothing_to_do(site, dagbag, capsys):
    run = dagbag.get_dag("opsync_reconcile").test()  # before any drain created the consumer group

    assert run.state == "success"
    assert "confirmed 0, reclaimed 0; buffered 0 (oldest 0 s), awaiting the replica 0" in capsys.readouterr().out


def test_reconcile_confirms_what_a_drain_without_its_sensor_committed(site, post, migrated, dagbag, capsys):
    posted = post(4)
    run = dagbag.get_dag("opsync_drain").test(mark_success_pattern="wait_for_replica|confirm")
    assert run.state == "success"
    assert states(site, posted) == ["committed"] * 4
    wait_for_replay(migrated)

    run = dagbag.get_dag("opsync_reconcile").test()

    assert run.state == "success"
    assert states(site, posted) == ["replicated"] * 4
    assert "confirmed 4, reclaimed 0; buffered 0" in capsys.readouterr().out


def test_reconcile_takes_over_a_crashed_drainers_entries_and_fails_on_what_is_stuck(site, post, dagbag, monkeypatch, capsys):
    posted = post(2)
    site.ensure_group()
    assert len(site.claim("crashed-drainer", 10)) == 2  # claimed, never applied: that drainer died
    dag = dagbag.get_dag("opsync_reconcile")
    reconcile = dag.get_task("reconcile")
    monkeypatch.setattr(reconcile, "reclaim_idle_s", 0)
    monkeypatch.setattr(reconcile, "stuck_after_s", 0.5)
    time.sleep(1)

    run = dag.test()

    assert run.state == "failed"
    log = capsys.readouterr().out
    assert "confirmed 0, reclaimed 2; buffered 2" in log
    assert re.search(r"2 transactions buffered, the oldest for \d+ s: is the drain running, is the primary reachable\?", log)
    pending = site.client.xpending_range(site.stream, site.group, "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"drainer"}

    assert dagbag.get_dag("opsync_drain").test().state == "success"  # the next drain applies them
    assert states(site, posted) == ["replicated"] * 2


def test_the_triggerer_can_import_the_triggers_from_the_installed_package(tmp_path):
    """The triggerer imports by classpath, without the DAGs or plugins folder on its path."""
    classpaths = [ReplicaLsnTrigger("0/1").serialize(), BufferWakeTrigger().serialize()]
    script = (
        "import json, sys\n"
        "from airflow.sdk._shared.module_loading import import_string\n"
        "for classpath, kwargs in json.loads(sys.argv[1]):\n"
        "    trigger = import_string(classpath)(**kwargs)\n"
        "    assert trigger.serialize() == (classpath, kwargs), trigger.serialize()\n"
        "    print(sys.modules[type(trigger).__module__].__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(classpaths)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(REPO / "plugins/opsync_airflow/triggers.py")] * 2


async def first_event(trigger, within: float):
    return await asyncio.wait_for(anext(trigger.run()), within)


def test_the_replica_trigger_waits_for_replay_and_never_takes_an_error_for_caught_up(site, migrated, monkeypatch, capfd):
    primary = create_engine(migrated.primary.url())
    target = Lsn(current_position(primary) + 1)  # not written yet
    trigger = ReplicaLsnTrigger(str(target), poke_interval=0.1)

    async def write_soon():
        await asyncio.sleep(0.5)
        with primary.begin() as conn:
            conn.execute(text("SELECT pg_logical_emit_message(false, 'opsync-test', 'x')"))

    async def both():
        writer = asyncio.create_task(write_soon())
        event = await first_event(trigger, 10)
        await writer
        return event

    started = time.monotonic()
    event = asyncio.run(both())
    assert time.monotonic() - started >= 0.5
    assert Lsn.parse(event.payload["replay_lsn"]) >= target and event.payload["target_lsn"] == str(target)

    # a replica that is down, or a server that is not a replaying standby (here: the primary), is waited through
    down = make_url(migrated.replica.url(driver="postgresql")).set(port=free_port()).render_as_string(hide_password=False)
    for url, problem in [(down, "replica unreachable: connection failed"), (migrated.primary.url(driver="postgresql"), "not in recovery")]:
        monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_REPLICA", url)
        with pytest.raises(TimeoutError):
            asyncio.run(first_event(ReplicaLsnTrigger("0/1", poke_interval=0.1), 1))
        out, err = capfd.readouterr()
        assert "still waiting for the replica to replay 0/1: " in out + err and problem in out + err
    primary.dispose()


def test_the_tls_extras_of_airflow_connections_reach_the_triggers_and_the_hooks(site, migrated, monkeypatch, capfd, tmp_path):
    """Extras as the providers document them. The test PostgreSQL has no TLS, so ``sslmode=require`` must fail,
    and for that reason: the trigger waits through it, saying why; the tasks' engine refuses too. A Redis
    on TLS only: its CA in the extras wakes the trigger and serves the tasks' buffer, another CA is refused."""
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_REPLICA", migrated.replica.url(driver="postgresql") + "?sslmode=require")
    with pytest.raises(TimeoutError):
        asyncio.run(first_event(ReplicaLsnTrigger("0/1", poke_interval=0.1), 1))
    out, err = capfd.readouterr()
    assert "replica unreachable: connection failed" in out + err and "server does not support SSL, but SSL was required" in out + err
    with pytest.raises(OperationalError, match="server does not support SSL, but SSL was required"):
        SiteDatabaseHook(REPLICA_CONN_ID).get_engine().connect()

    with tls_redis(tmp_path) as server:
        plain_url = server.url().replace("rediss://", "redis://")  # TLS from the extras alone
        monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", f"{plain_url}?ssl=true&ssl_ca_certs={server.ca}")
        assert asyncio.run(woken(SiteBufferHook().get_buffer()))["txn_id"] == "over-tls"
        monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", f"{plain_url}?ssl=true&ssl_ca_certs={server.wrong_ca}")
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            asyncio.run(first_event(BufferWakeTrigger(), 10))
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            SiteBufferHook().get_buffer().client.ping()


async def woken(buffer: Buffer) -> dict:
    """The wake-up trigger's event for an accepted record published on ``buffer`` once the trigger listens."""
    waiting = asyncio.create_task(first_event(BufferWakeTrigger(), 10))
    while buffer.client.pubsub_numsub(buffer.events)[0][1] == 0:
        assert not waiting.done(), waiting.exception()
        await asyncio.sleep(0.01)
    buffer.client.publish(buffer.events, json.dumps({"txn_id": "over-tls", "state": "accepted"}))
    return (await waiting).payload


def test_the_wake_up_trigger_fires_on_accepted_records_only(site, post):
    """The drain's own state changes are published first, then an accepted record as a marker: the
    trigger wakes on the marker, so it let every earlier message pass. Published once it is subscribed."""

    async def first_wake(publish) -> dict:
        subscribed = site.client.pubsub_numsub(site.events)[0][1]
        waiting = asyncio.create_task(first_event(BufferWakeTrigger(), 15))
        while site.client.pubsub_numsub(site.events)[0][1] == subscribed:
            assert not waiting.done(), waiting.exception()
            await asyncio.sleep(0.01)
        publish()
        return (await waiting).payload

    def drains_then_accepts() -> str:
        for state in ("committed", "replicated", "failed"):
            site.client.publish(site.events, json.dumps({"txn_id": f"drain-{state}", "state": state}))
        return post()[0][0]

    marker = []
    payload = asyncio.run(first_wake(lambda: marker.append(drains_then_accepts())))
    assert payload == {"channel": site.events, "txn_id": marker[0]}
