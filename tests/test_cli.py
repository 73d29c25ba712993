"""``opsync status``, ``backlog drain``, ``replay`` and the exit codes of every command, against real Redis
(a fresh one per test: ``own_redis``) and the real PostgreSQL primary with its streaming replica."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port
from sqlalchemy import text

from opsync import cli
from opsync.buffer import Buffer
from opsync.buffer.figures import buffer_stats
from opsync.cli import backlog, common
from opsync.config import get_settings
from opsync.ingest import StepIn, build_transaction
from opsync.lsn import current_position, replica_position
from opsync.monitoring.status import site_status
from opsync.read_model.publisher import Publisher
from opsync.read_model.store import ReadModel

OPSYNC = Path(sys.executable).with_name("opsync")  # the installed entry point of this venv
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture
def run(site_env, own_redis):
    """``run(*args)``: ``opsync`` in-process on this test's fresh Redis; stdout and stderr apart."""
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.main, list(args), catch_exceptions=False)


@pytest.fixture
def buffer(own_redis):
    """The buffer the CLI uses: the settings' Redis, default prefix."""
    return Buffer(own_redis.client())


def buffered(buffer: Buffer, observation, n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        txn = build_transaction([StepIn(table="executed_obs_unit", values=observation())], "test")
        buffer.enqueue(txn, {"txn_id": str(txn.txn_id)})
        ids.append(str(txn.txn_id))
    return ids


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def in_ledger(primary_engine, txn_ids: list[str]) -> int:
    with primary_engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM sync_ledger WHERE txn_id = ANY(:t)"), {"t": txn_ids}).scalar()


def wait_replayed(primary_engine, replica_engine) -> None:
    target = current_position(primary_engine)
    deadline = time.monotonic() + 15
    while replica_position(replica_engine) < target:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.05)


# --- exit codes ------------------------------------------------------------------------------------------


def test_help_and_readme_document_every_exit_code():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    operating = README.read_text().split("## Operating", 1)[1].split("\n## ", 1)[0]
    for code in common.EXIT_CODES:
        assert f"  {code:<3} " in result.stdout
        assert f"| {code} |" in operating, f"README's Operating section lacks exit code {code}"


def test_usage_errors_exit_2(run):
    for args in (
        ("status", "--interval", "0"),
        ("backlog", "drain", "--batch", "0"),
        ("backlog", "drain", "--batch-records", "0"),
        ("backlog", "drain", "--batch-bytes", "-1"),
        ("replay",),
        ("replay", "--since", "yesterday"),
        ("replay", "--since", "2026-11-21T03:00"),
        ("replay", "--since", "1d", "--table", "no_such_table"),
        ("replay", "--since", "1h", "--until", "2h"),
    ):
        result = run(*args)
        assert result.exit_code == common.USAGE, (args, result.output)
        assert result.stdout == "" and "Traceback" not in result.stderr


def test_unknown_dead_letter_exits_4(run):
    missing = str(uuid.uuid4())
    for args in (("dlq", "show", missing), ("dlq", "requeue", missing, "--yes"), ("dlq", "discard", missing, "--yes")):
        result = run(*args)
        assert result.exit_code == common.NOT_FOUND, (args, result.output)
        assert missing in result.stderr


def test_stopped_redis_makes_status_degraded_and_the_rest_unavailable(run, own_redis, buffer, observation, tmp_path, monkeypatch):
    buffered(buffer, observation)
    monkeypatch.setenv("OPSYNC_READ_MODEL_PATH", str(tmp_path / "opsync.db"))
    get_settings.cache_clear()
    (tmp_path / "opsync.db").touch()
    own_redis.stop()
    try:
        status = run("status", "--json")
        assert status.exit_code == common.DEGRADED, status.output
        assert json.loads(status.stdout)["unavailable"].keys() == {"redis"}
        for args in (("dlq", "list"), ("dlq", "show", str(uuid.uuid4())), ("backlog", "drain"), ("replay", "--since", "1h")):
            result = run(*args)
            assert result.exit_code == common.UNAVAILABLE, (args, result.output)
            assert result.stderr.startswith("Error: cannot reach the site buffer (Redis)") and result.stderr.count("\n") == 1
    finally:
        own_redis.start()
    assert buffer_stats(buffer.client, buffer).depth == 1  # nothing lost


def test_unreachable_primary_is_unavailable_and_loses_nothing(run, buffer, observation, monkeypatch):
    buffered(buffer, observation, 3)
    password = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPSYNC_PRIMARY_URL", f"postgresql+psycopg://opsync:{password}@127.0.0.1:{free_port()}/opsync")
    get_settings.cache_clear()
    drained = run("backlog", "drain", "--json")
    assert drained.exit_code == common.UNAVAILABLE, drained.output
    assert "3 transactions stay buffered" in drained.stderr and password not in drained.output
    assert buffer_stats(buffer.client, buffer).depth == 3
    status = run("status", "--json")
    assert status.exit_code == common.DEGRADED and "primary" in json.loads(status.stdout)["unavailable"]
    tokens = run("tokens", "list")
    assert tokens.exit_code == common.UNAVAILABLE and tokens.stderr.startswith("Error: cannot reach the primary")


# --- status ----------------------------------------------------------------------------------------------


def test_status_json_matches_site_status(run, site_env, buffer, observation, primary_engine, replica_engine):
    buffered(buffer, observation, 5)

    result = run("status", "--json")

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    direct = site_status(buffer, primary_engine, replica_engine, slot=site_env.site).as_json()
    assert shown.keys() == direct.keys() | {"limits_passed"} and shown["limits_passed"] == []
    for figure in ("depth", "pending", "committed_not_replicated", "dead_letters", "last_drain_s", "last_confirm_s"):
        assert shown["buffer"][figure] == direct["buffer"][figure], figure
    assert shown["buffer"]["depth"] == 5 and shown["unavailable"] == {} and not shown["degraded"]
    assert 0 <= shown["buffer"]["oldest_age_s"] <= direct["buffer"]["oldest_age_s"]
    assert shown["replica"]["slot"]["name"] == site_env.site and shown["replica"]["slot"]["wal_status"] == "reserved"
    assert shown["capacity"]["drain_eta"]["state"] in ("unknown", "never") and shown["capacity"]["room"] > 0
    human = run("status")
    assert human.exit_code == 0 and "buffered" in human.stdout and "5 (0 claimed by a drainer)" in human.stdout
    for row in ("replica slot", f"{site_env.site}: reserved", "high-water in", "drain ETA"):
        assert row in human.stdout, row


def test_status_limits_make_it_degraded(run, buffer, observation):
    buffered(buffer, observation, 3)
    assert run("status", "--max-depth", "3", "--max-dead-letters", "0", "--json").exit_code == 0

    over = run("status", "--max-depth", "2", "--max-age", "0", "--json")

    assert over.exit_code == common.DEGRADED, over.output
    passed = json.loads(over.stdout)["limits_passed"]
    assert len(passed) == 2 and "3 transactions buffered (over --max-depth 2)" in passed[0] and "--max-age 0" in passed[1]
    human = run("status", "--max-depth", "2")
    assert human.exit_code == common.DEGRADED and "--max-depth 2" in human.stdout


def test_status_watch_refreshes_count_times(run, buffer, observation):
    buffered(buffer, observation, 2)
    started = time.monotonic()

    result = run("status", "--watch", "--interval", "0.2", "--count", "3", "--json")

    assert result.exit_code == 0, result.output
    reports = lines(result.stdout)
    assert len(reports) == 3 and [r["buffer"]["depth"] for r in reports] == [2, 2, 2]
    assert time.monotonic() - started >= 0.4  # two waits between three refreshes
    assert len({r["at"] for r in reports}) == 3
    human = run("status", "--count", "2", "--interval", "0.1")  # --count implies --watch; piped, Live shows the last
    assert human.exit_code == 0 and "opsync status at" in human.stdout and "replica lag" in human.stdout


# --- backlog drain ---------------------------------------------------------------------------------------


def test_backlog_drain_follow_drains_and_confirms_with_decreasing_progress(run, buffer, observation, primary_engine, monkeypatch):
    txn_ids = buffered(buffer, observation, 2000)
    monkeypatch.setattr(backlog, "DRAIN_SLICE_S", 0.05)  # many progress lines from a small backlog

    result = run("backlog", "drain", "--follow", "--batch", "50", "--json")

    assert result.exit_code == 0, result.output
    events = lines(result.stdout)
    start, progress, done = events[0], events[1:-1], events[-1]
    assert start["event"] == "start" and start["remaining"] == 2000
    assert len(progress) >= 3 and {e["event"] for e in progress} == {"progress"}
    remaining = [e["remaining"] for e in progress]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] < 2000 and remaining[-1] > 0
    assert any(e["rate_per_s"] for e in progress) and any(e["eta_s"] is not None for e in progress)
    assert done | {"elapsed_s": 0, "rate_per_s": 0, "eta_s": 0, "batches": 0} == {
        "event": "done",
        "remaining": 0,
        "buffered": 0,
        "awaiting_replica": 0,
        "applied": 2000,
        "duplicates": 0,
        "dead_lettered": 0,
        "confirmed": 2000,
        "batches": 0,
        "rate_per_s": 0,
        "eta_s": 0,
        "elapsed_s": 0,
    }
    assert done["batches"] == 40
    stats = buffer_stats(buffer.client, buffer)
    assert (stats.depth, stats.awaiting_replica, stats.pending) == (0, 0, 0)
    assert in_ledger(primary_engine, txn_ids) == 2000
    assert {s["state"] for s in map(buffer.status, txn_ids[::100])} == {"replicated"}
    consumers = buffer.client.xinfo_consumers(buffer.stream, buffer.group)
    assert not [c for c in consumers if c["name"].decode().startswith("cli-")]  # its consumer left the group


def test_backlog_drain_once_and_with_a_progress_bar(run, buffer, observation, primary_engine):
    first = buffered(buffer, observation, 30)
    once = run("backlog", "drain", "--batch", "7", "--json")
    assert once.exit_code == 0, once.output
    [summary] = lines(once.stdout)  # no progress lines without --follow
    assert (summary["event"], summary["applied"], summary["buffered"], summary["batches"]) == ("done", 30, 0, 5)
    assert summary["awaiting_replica"] == 30 and summary["confirmed"] == 0  # the DAG's sensor, or --follow, confirms
    assert in_ledger(primary_engine, first) == 30

    buffered(buffer, observation, 20)
    human = run("backlog", "drain", "--follow", "--batch", "8")
    assert human.exit_code == 0, human.output
    assert human.stdout == ""  # the bar and the summary are messages: stderr
    assert "txn/s" in human.stderr and "ETA" in human.stderr and "remaining" in human.stderr
    assert "20 applied" in human.stderr and "50 confirmed replicated" in human.stderr
    assert "0 still buffered, 0 await the replica" in human.stderr
    nothing = run("backlog", "drain", "--follow", "--json")
    assert nothing.exit_code == 0 and lines(nothing.stdout)[-1]["applied"] == 0


def test_backlog_drain_takes_its_batch_caps_from_the_options_else_from_the_dags_settings(
    run, buffer, observation, primary_engine, monkeypatch
):
    monkeypatch.setenv("OPSYNC_DRAIN_BATCH_SIZE", "4")
    first = buffered(buffer, observation, 10)
    from_settings = run("backlog", "drain", "--json")
    assert from_settings.exit_code == 0, from_settings.output
    assert (lines(from_settings.stdout)[-1]["applied"], lines(from_settings.stdout)[-1]["batches"]) == (10, 3)  # 4, 4, 2

    second = buffered(buffer, observation, 10)
    by_records = run("backlog", "drain", "--batch", "100", "--batch-records", "3", "--json")
    assert by_records.exit_code == 0, by_records.output
    assert (lines(by_records.stdout)[-1]["applied"], lines(by_records.stdout)[-1]["batches"]) == (10, 4)  # 3, 3, 3, 1

    third = buffered(buffer, observation, 3)
    by_bytes = run("backlog", "drain", "--batch-bytes", "1", "--json")  # each transaction is larger: each goes alone
    assert by_bytes.exit_code == 0, by_bytes.output
    assert (lines(by_bytes.stdout)[-1]["applied"], lines(by_bytes.stdout)[-1]["batches"]) == (3, 3)
    assert in_ledger(primary_engine, first + second + third) == 23

    buffered(buffer, observation, 2)
    monkeypatch.setenv("OPSYNC_DRAIN_BATCH_RECORDS", "0")
    refused = run("backlog", "drain")
    assert refused.exit_code == common.USAGE, refused.output
    assert "OPSYNC_DRAIN_BATCH_RECORDS" in refused.stderr and "greater than 0" in refused.stderr
    assert "Traceback" not in refused.stderr and buffer_stats(buffer.client, buffer).depth == 2  # nothing drained


def test_backlog_drain_follow_with_the_replica_unreachable_exits_5_after_applying(run, buffer, observation, monkeypatch):
    buffered(buffer, observation, 4)
    monkeypatch.setenv("OPSYNC_REPLICA_URL", f"postgresql+psycopg://opsync@127.0.0.1:{free_port()}/opsync")
    get_settings.cache_clear()

    result = run("backlog", "drain", "--follow")

    assert result.exit_code == common.UNAVAILABLE, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: cannot reach the replica")
    stats = buffer_stats(buffer.client, buffer)
    assert (stats.depth, stats.awaiting_replica) == (0, 4)  # committed, confirmed once the replica is back


def test_ctrl_c_stops_backlog_drain_between_batches(site_env, buffer, own_redis, observation, primary_engine):
    txn_ids = buffered(buffer, observation, 3000)  # one per batch: far more than a run drains before the signal lands
    env = {**os.environ, "OPSYNC_REDIS_URL": own_redis.url}
    with subprocess.Popen(
        [str(OPSYNC), "backlog", "drain", "--follow", "--batch", "1", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        start, first = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert start["event"] == "start" and start["remaining"] == 3000 and first["event"] == "progress"
    assert proc.returncode == common.INTERRUPTED, err
    last = json.loads(out.splitlines()[-1])
    assert last["event"] == "interrupted" and "Interrupted between batches" in err and "Traceback" not in err
    stats = buffer_stats(buffer.client, buffer)
    assert stats.pending == 0  # every claimed entry was applied and acknowledged: nothing half-done
    assert first["applied"] <= last["applied"] < 3000 and stats.depth == 3000 - last["applied"]
    assert in_ledger(primary_engine, txn_ids) == last["applied"]
    assert [c["name"] for c in buffer.client.xinfo_consumers(buffer.stream, buffer.group)] == []


# --- replay ----------------------------------------------------------------------------------------------


@pytest.fixture
def read_model(own_redis, replica_engine, tmp_path, monkeypatch):
    """A read model filled by the publisher's full load, at the path the settings name."""
    path = tmp_path / "opsync.db"
    monkeypatch.setenv("OPSYNC_READ_MODEL_PATH", str(path))
    get_settings.cache_clear()

    def load() -> Path:
        publisher = Publisher(ReadModel(path, get_settings().timezone), Buffer(own_redis.client()), replica_engine)
        publisher.follow_replica()
        publisher.model.close()
        return path

    return load


def instrument_rows(path: Path, keys: list[str]) -> dict[str, tuple]:
    with sqlite3.connect(path) as conn:
        marks = ", ".join("?" * len(keys))
        return {r[0]: tuple(r) for r in conn.execute(f"SELECT * FROM instrument WHERE id IN ({marks})", keys)}


def test_replay_reproduces_lost_rows_and_is_idempotent(run, read_model, primary_engine, replica_engine):
    before = datetime.now(UTC) - timedelta(seconds=1)
    keys = [str(uuid.uuid4()) for _ in range(4)]
    with primary_engine.begin() as conn:
        # A purge by an earlier test of the session would make this day's range incomplete (exit 3):
        # replay on a site that has purged nothing, as the test's range assumes.
        conn.execute(text("UPDATE row_change_horizon SET purged_below = 0"))
        for key in keys:
            conn.execute(text("INSERT INTO instrument (id, name) VALUES (:id, :name)"), {"id": key, "name": f"replay-{key}"})
    wait_replayed(primary_engine, replica_engine)
    path = read_model()
    loaded = instrument_rows(path, keys)
    assert len(loaded) == 4
    with sqlite3.connect(path) as conn:  # what a restore from an older backup, or a publisher bug, leaves
        conn.execute("DELETE FROM instrument WHERE id IN (?, ?)", keys[:2])
        conn.execute("UPDATE instrument SET name = 'wrong' WHERE id = ?", (keys[2],))
    with primary_engine.begin() as conn:  # deleted while no publisher ran: the file still shows it
        conn.execute(text("DELETE FROM instrument WHERE id = :id"), {"id": keys[3]})
    wait_replayed(primary_engine, replica_engine)

    early = run("replay", "--since", "1d", "--until", before.isoformat(), "--table", "instrument", "--json")
    assert early.exit_code == 0, early.output
    untouched = instrument_rows(path, keys)  # the range excludes our changes: nothing of ours replayed
    assert set(untouched) == set(keys[2:]) and untouched[keys[2]][1] == "wrong"

    first = run("replay", "--since", before.isoformat(), "--json")

    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["complete"] and report["read_model"] == str(path)
    assert report["tables"]["instrument"]["changed"] >= 4
    assert report["tables"]["instrument"]["written"] >= 4  # 2 restored, 1 corrected, 1 deleted
    repaired = instrument_rows(path, keys)
    assert set(repaired) == set(keys[:3])
    for key in keys[:3]:
        assert repaired[key][:-1] == loaded[key][:-1]  # all but _updated_at: as the publisher showed them
    second = run("replay", "--since", before.isoformat(), "--json")
    assert second.exit_code == 0
    assert {t["written"] for t in json.loads(second.stdout)["tables"].values()} == {0}
    assert instrument_rows(path, keys) == repaired  # _updated_at too: replaying again changes nothing
    human = run("replay", "--since", before.isoformat(), "--table", "instrument")
    assert human.exit_code == 0 and "instrument" in human.stdout and "rewritten" in human.stdout
    assert "executed_obs_unit" not in human.stdout


def test_replay_of_purged_changes_is_degraded_and_without_a_read_model_not_found(
    run, read_model, primary_engine, replica_engine, tmp_path, monkeypatch
):
    path = read_model()
    with primary_engine.begin() as conn:
        conn.execute(text("UPDATE row_change_horizon SET purged_below = 1"))
    try:
        wait_replayed(primary_engine, replica_engine)
        result = run("replay", "--since", "2000-01-01", "--json")
        assert result.exit_code == common.DEGRADED, result.output
        assert json.loads(result.stdout)["complete"] is False and "purged" in result.stderr
    finally:
        with primary_engine.begin() as conn:
            conn.execute(text("UPDATE row_change_horizon SET purged_below = 0"))
    assert path.exists()
    monkeypatch.setenv("OPSYNC_READ_MODEL_PATH", str(tmp_path / "nowhere.db"))
    get_settings.cache_clear()
    missing = run("replay", "--since", "1h")
    assert missing.exit_code == common.NOT_FOUND and "no read model" in missing.stderr
    assert not (tmp_path / "nowhere.db").exists()
