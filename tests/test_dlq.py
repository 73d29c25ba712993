"""Dead letters from the operator's side (list, show, requeue exactly once, discard, audit) and
``opsync status``, against real Redis and a real PostgreSQL primary with its streaming replica."""

import getpass
import json
import threading
import time
import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from opsync import cli, dlq, drain, merged, registry
from opsync.buffer import Buffer
from opsync.buffer.figures import buffer_stats
from opsync.cli import common
from opsync.cli import status as cli_status
from opsync.config import get_settings
from opsync.envelope import Op
from opsync.ingest import StepIn, build_transaction
from opsync.monitoring.status import site_status
from tests.conftest import free_port

SHA = "cd" * 32
FILES = registry.get_table("raw_data_file")


@pytest.fixture
def buffer(redis_server):
    return Buffer(redis_server.client(), prefix=f"dlq-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def primary(migrated):
    engine = create_engine(migrated.primary.url(), connect_args={"connect_timeout": 5})
    yield engine
    engine.dispose()


@pytest.fixture
def replica(migrated):
    engine = create_engine(migrated.replica.url(), connect_args={"connect_timeout": 5})
    yield engine
    engine.dispose()


@pytest.fixture
def site_buffer(own_redis):
    """The buffer the CLI uses: the settings' Redis (a fresh one for this test), default prefix."""
    return Buffer(own_redis.client())


@pytest.fixture
def cli_run(site_env, own_redis):
    """``cli_run(*args, input=None)``: ``opsync`` in-process; stdout and stderr apart."""
    runner = CliRunner()
    return lambda *args, input=None: runner.invoke(cli.main, list(args), input=input, catch_exceptions=False)


def buffered(buffer: Buffer, *steps: StepIn):
    txn = build_transaction(list(steps), "test")
    buffer.enqueue(txn, {"txn_id": str(txn.txn_id)})
    return txn


def raw_file(obs_id, **values) -> StepIn:
    return StepIn(
        table="raw_data_file",
        values={
            "executed_obs_unit_id": str(obs_id),
            "path": f"/data/{uuid.uuid4()}.fits",
            "size_bytes": 10,
            "checksum_sha256": SHA,
            "file_type": "fits",
        }
        | values,
    )


def poison(buffer: Buffer, primary, planning):
    """A file of an observation the primary does not have, and an update of that file (its dependant), drained.

    Returns (missing observation's id, poison, dependant, a good transaction between them).
    """
    missing_obs = uuid.uuid4()
    bad = buffered(buffer, raw_file(missing_obs))
    dependant = buffered(buffer, StepIn(op=Op.update, table="raw_data_file", id=bad.steps[0].key, values={"size_bytes": 99}))
    good = buffered(buffer, StepIn(table="executed_obs_unit", values=observation(planning)))  # last: see unsent()
    summary = drain.drain(buffer, primary)
    assert (summary.applied, summary.dead_lettered) == (1, 2)
    return missing_obs, bad, dependant, good


def observation(planning) -> dict:
    return {"obs_unit_id": str(planning["obs_unit"]), "instrument_module_id": str(planning["module"]), "start_time": "2026-11-21T03:00:00Z"}


def fix_cause(primary, planning, obs_id) -> None:
    """What the operator does: create the missing observation on the primary."""
    with primary.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time)"
                " VALUES (:id, :o, :m, '2026-11-21T03:00:00Z')"
            ),
            {"id": obs_id, "o": planning["obs_unit"], "m": planning["module"]},
        )


def file_rows(primary, key) -> list[tuple]:
    with primary.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, size_bytes FROM raw_data_file WHERE id = :k"), {"k": key})]


def in_ledger(primary, txns) -> int:
    with primary.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM sync_ledger WHERE txn_id = ANY(:t)"), {"t": [str(t.txn_id) for t in txns]}).scalar()


def unsent(buffer: Buffer) -> int:
    """Transactions the drainer has not acknowledged (the stream also keeps committed ones until replicated).

    Exact only while the drainer's last entry is still in the stream: once it is dead-lettered (deleted),
    Redis 7.0 reports no group lag and the figure falls back to the stream's length (see opsync.buffer.figures).
    """
    return buffer_stats(buffer.client, buffer).depth


def confirm_all(buffer: Buffer, replica, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while drain.confirm_replica(buffer, replica).remaining:
        assert time.monotonic() < deadline, "the replica never caught up"
        time.sleep(0.05)


# --- core: opsync.dlq --------------------------------------------------------------------------------


def test_list_and_show_name_the_reason_and_the_dependants(buffer, primary, planning):
    _, bad, dependant, _ = poison(buffer, primary, planning)

    letters = dlq.dead_letters(buffer)

    assert [d.txn_id for d in letters] == [str(bad.txn_id), str(dependant.txn_id)]
    first = letters[0].summary()
    assert first["tables"] == ["raw_data_file"] and first["step_count"] == 1 and first["failed_at"]
    assert "foreign key constraint" in first["reason"]
    assert letters[1].depends_on == str(bad.txn_id)
    assert [d.txn_id for d in dlq.dependants(buffer, str(bad.txn_id))] == [str(dependant.txn_id)]
    shown = dlq.find(buffer, str(bad.txn_id)).details()
    assert shown["steps"][0]["key"] == str(bad.steps[0].key) and shown["site"] == "test"
    with pytest.raises(dlq.UnknownTransaction):
        dlq.find(buffer, str(uuid.uuid4()))


def test_requeue_after_fixing_the_cause_applies_exactly_once(buffer, primary, replica, planning):
    missing_obs, bad, dependant, good = poison(buffer, primary, planning)
    file_key = bad.steps[0].key
    fix_cause(primary, planning, missing_obs)

    actions = dlq.requeue(buffer, str(bad.txn_id), by="alice")

    assert [(a.txn_id, a.changed, a.by) for a in actions] == [(str(bad.txn_id), True, "alice"), (str(dependant.txn_id), True, "alice")]
    status = buffer.status(bad.txn_id)
    assert status["state"] == "accepted" and status["requeued_by"] == "alice"
    assert "foreign key constraint" in status["previous_reason"] and status["previous_failed_at"]
    assert "reason" not in status and buffer.client.ttl(buffer.status_key(bad.txn_id)) == -1  # travelling: kept
    assert buffer.dead_owners([f"raw_data_file:{file_key}"]) == {}  # dependants are no longer refused
    assert dlq.dead_letters(buffer) == [] and unsent(buffer) == 2
    assert merged.get_row(buffer, replica, FILES, file_key)["_sync_state"] == "buffered"

    again = dlq.requeue(buffer, str(bad.txn_id), by="bob")  # a second operator, or a double click
    assert [(a.changed, a.by) for a in again] == [(False, "alice")] and unsent(buffer) == 2

    summary = drain.drain(buffer, primary)

    assert (summary.applied, summary.dead_lettered) == (2, 0)
    assert file_rows(primary, file_key) == [(file_key, 99)]  # the file once, the dependant's update applied
    assert in_ledger(primary, [bad, dependant, good]) == 3
    assert drain.drain(buffer, primary).batches == 0
    confirm_all(buffer, replica)
    assert [s["state"] for s in buffer.statuses([bad.txn_id, dependant.txn_id])] == ["replicated"] * 2
    assert merged.get_row(buffer, replica, FILES, file_key)["size_bytes"] == 99
    audit = dlq.history(buffer)
    assert [(e["action"], e["txn_id"], e["by"]) for e in audit] == [
        ("requeue", str(dependant.txn_id), "alice"),
        ("requeue", str(bad.txn_id), "alice"),
    ]
    assert all(e["at"] for e in audit) and "foreign key" in audit[1]["reason"]


def test_concurrent_requeues_enqueue_once(buffer, primary, planning):
    missing_obs, bad, _, _ = poison(buffer, primary, planning)
    fix_cause(primary, planning, missing_obs)
    start = threading.Barrier(8)
    results = []

    def operator(n: int) -> None:
        start.wait()
        results.extend(dlq.requeue(buffer, str(bad.txn_id), by=f"op{n}", with_dependants=False))

    threads = [threading.Thread(target=operator, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(a.changed for a in results) == 1 and len(results) == 8
    assert unsent(buffer) == 1
    assert [e["action"] for e in dlq.history(buffer)] == ["requeue"]
    assert len(dlq.dead_letters(buffer)) == 1  # the dependant, not asked for
    with pytest.raises(dlq.UnknownTransaction, match="no dead-lettered transaction"):
        dlq.discard(buffer, str(bad.txn_id), by="late")  # requeued meanwhile: nothing to discard
    assert drain.drain(buffer, primary).applied == 1
    assert in_ledger(primary, [bad]) == 1


def test_requeue_without_fixing_fails_again_and_can_be_requeued_again(buffer, primary, planning):
    missing_obs, bad, _, _ = poison(buffer, primary, planning)
    dlq.requeue(buffer, str(bad.txn_id), by="alice")
    assert drain.drain(buffer, primary).dead_lettered == 2  # cause not fixed: both back in the dead letters
    status = buffer.status(bad.txn_id)
    assert status["state"] == "failed" and "foreign key" in status["reason"] and status["previous_reason"]

    fix_cause(primary, planning, missing_obs)
    assert [a.changed for a in dlq.requeue(buffer, str(bad.txn_id), by="alice")] == [True, True]
    assert drain.drain(buffer, primary).applied == 2


def test_discard_hides_the_overlay_rows_and_is_audited(buffer, primary, replica, planning):
    _, bad, dependant, _ = poison(buffer, primary, planning)
    file_key = bad.steps[0].key
    assert merged.get_row(buffer, replica, FILES, file_key)["_sync_state"] == "failed"

    action = dlq.discard(buffer, str(bad.txn_id), by="carol")

    assert (action.action, action.changed, action.by) == ("discard", True, "carol")
    row = merged.get_row(buffer, replica, FILES, file_key)  # its latest change is the dependant's, still dead-lettered
    assert (row["_sync_state"], row["_txn_id"]) == ("failed", str(dependant.txn_id))
    status = buffer.status(bad.txn_id)
    assert (status["state"], status["discarded_by"]) == ("failed", "carol") and status["discarded_at"] == action.at
    assert 0 < buffer.client.ttl(buffer.status_key(bad.txn_id))  # final: kept for the retention, then gone
    assert buffer.dead_owners([f"raw_data_file:{file_key}"]) == {}
    assert [d.txn_id for d in dlq.dead_letters(buffer)] == [str(dependant.txn_id)]  # not discarded with it
    audited = dlq.history(buffer)[0]
    assert audited | {"at": "", "entry": ""} == {
        "action": "discard",
        "txn_id": str(bad.txn_id),
        "by": "carol",
        "at": "",
        "entry": "",
        "reason": audited["reason"],
    }
    assert audited["at"] == action.at and "foreign key" in audited["reason"]

    again = dlq.discard(buffer, str(bad.txn_id), by="dave")
    assert (again.changed, again.by) == (False, "carol") and len(dlq.history(buffer)) == 1
    dlq.discard(buffer, str(dependant.txn_id), by="carol")
    assert merged.get_row(buffer, replica, FILES, file_key) is None  # no overlay left, and never in the replica
    assert buffer.index_contains(buffer.rows_index("raw_data_file"), [str(file_key)]) == [False]
    with pytest.raises(dlq.UnknownTransaction, match="was discarded"):
        dlq.requeue(buffer, str(bad.txn_id), by="dave")
    assert unsent(buffer) == 0


def test_an_unreadable_envelope_can_only_be_discarded(buffer, primary):
    buffer.ensure_group()
    buffer.client.xadd(buffer.stream, {"txn": b"{not json"})
    assert drain.drain(buffer, primary).dead_lettered == 1
    (letter,) = dlq.dead_letters(buffer)
    assert letter.txn_id == "" and letter.txn is None and "unreadable envelope" in letter.reason

    with pytest.raises(dlq.CannotRequeue):
        dlq.requeue(buffer, letter.entry_id, by="alice")
    action = dlq.discard(buffer, letter.entry_id, by="alice")

    assert (action.txn_id, action.changed) == (letter.entry_id, True)
    assert dlq.dead_letters(buffer) == [] and dlq.history(buffer)[0]["entry"] == letter.entry_id


# --- the CLI: opsync dlq ---------------------------------------------------------------------------------


def test_cli_dlq_list_show_requeue_discard(cli_run, site_buffer, primary, planning):
    missing_obs, bad, dependant, _ = poison(site_buffer, primary, planning)
    other = buffered(site_buffer, raw_file(uuid.uuid4()))
    drain.drain(site_buffer, primary)
    bad_id, other_id = str(bad.txn_id), str(other.txn_id)

    listed = cli_run("dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [d["txn_id"] for d in json.loads(listed.stdout)] == [bad_id, str(dependant.txn_id), other_id]
    human = cli_run("dlq", "list")
    assert bad_id in human.stdout and "raw_data_file" in human.stdout and "3 dead-lettered" in human.stderr
    shown = cli_run("dlq", "show", bad_id, "--json")
    assert json.loads(shown.stdout)["dependants"] == [str(dependant.txn_id)]
    assert "foreign key" in cli_run("dlq", "show", bad_id).stdout
    assert cli_run("dlq", "show", str(uuid.uuid4())).exit_code == 4

    fix_cause(primary, planning, missing_obs)
    declined = cli_run("dlq", "requeue", bad_id, input="n\n")
    assert declined.exit_code == 1 and "1 dead-lettered transactions failed because of it" in declined.stderr
    assert len(json.loads(cli_run("dlq", "list", "--json").stdout)) == 3  # nothing changed
    requeued = cli_run("dlq", "requeue", bad_id, input="y\n")
    assert requeued.exit_code == 0, requeued.output
    assert f"requeued (the next drain applies it) by {getpass.getuser()}" in requeued.stderr
    again = cli_run("dlq", "requeue", bad_id, "--yes", "--json")
    assert again.exit_code == 0 and [a["changed"] for a in json.loads(again.stdout)] == [False]
    assert drain.drain(site_buffer, primary).applied == 2

    discarded = cli_run("dlq", "discard", other_id, "--yes", "--by", "carol", "--json")
    assert discarded.exit_code == 0, discarded.output
    assert json.loads(discarded.stdout)[0] | {"at": ""} == {
        "action": "discard",
        "txn_id": other_id,
        "by": "carol",
        "at": "",
        "changed": True,
    }
    assert cli_run("dlq", "discard", str(uuid.uuid4()), "--yes").exit_code == 4
    assert cli_run("dlq", "requeue", other_id, "--yes").exit_code == 4  # discarded: nothing to requeue
    history = json.loads(cli_run("dlq", "history", "--json").stdout)
    assert [(e["action"], e["by"]) for e in history] == [
        ("discard", "carol"),
        ("requeue", getpass.getuser()),
        ("requeue", getpass.getuser()),
    ]
    assert json.loads(cli_run("dlq", "list", "--json").stdout) == []


# --- opsync status ---------------------------------------------------------------------------------------


def wait_caught_up(cli_run, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = cli_run("status", "--json")
        report = json.loads(result.stdout)
        if result.exit_code == 0 and report["replica"]["lag_bytes"] == 0:
            return report
        assert time.monotonic() < deadline, f"replica never caught up: {report}"
        time.sleep(0.2)


def test_status_matches_the_buffer_figures_and_the_replica_catches_up(cli_run, site_buffer, primary, replica, planning):
    poison(site_buffer, primary, planning)  # one committed, two dead-lettered
    buffered(site_buffer, StepIn(table="executed_obs_unit", values=observation(planning)))  # still buffered

    result = cli_run("status", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stats = buffer_stats(site_buffer.client, site_buffer)
    assert report["buffer"] | {"oldest_age_s": 0, "last_drain_s": 0} == {
        "depth": stats.depth,
        "pending": stats.pending,
        "oldest_age_s": 0,
        "committed_not_replicated": stats.awaiting_replica,
        "dead_letters": stats.dead_letters,
        "last_drain_s": 0,
        "last_confirm_s": None,
    }
    assert 0 <= report["buffer"]["last_drain_s"] <= stats.last_drain_s
    assert (stats.depth, stats.awaiting_replica, stats.dead_letters) == (1, 1, 2)
    assert 0 <= report["buffer"]["oldest_age_s"] <= stats.oldest_age_s + 1
    assert report["unavailable"] == {} and report["replica"]["lag_from"] == "replica"
    human = cli_run("status")
    assert human.exit_code == 0 and "committed, not replicated" in human.stdout and "dead letters" in human.stdout
    assert "last drain" in human.stdout and "last confirm" in human.stdout

    caught_up = wait_caught_up(cli_run)
    assert caught_up["replica"]["lag_s"] == 0 and caught_up["replica"]["primary_lsn"] == caught_up["replica"]["replica_lsn"]
    confirm_all(site_buffer, replica)
    assert json.loads(cli_run("status", "--json").stdout)["buffer"]["committed_not_replicated"] == 0


def test_status_shows_the_lag_while_the_replica_is_stopped(cli_run, migrated, site_buffer, primary):
    wait_caught_up(cli_run)
    migrated.replica.stop()
    try:
        with primary.begin() as conn:
            conn.execute(text("INSERT INTO instrument (id, name) VALUES (:i, :n)"), {"i": uuid.uuid4(), "n": f"lag-{uuid.uuid4()}"})
        result = cli_run("status", "--json")
        report = json.loads(result.stdout)
        assert result.exit_code == common.DEGRADED
        assert report["degraded"] and "replica" in report["unavailable"]
        assert report["replica"]["lag_from"] == "slot" and report["replica"]["lag_bytes"] > 0
        assert report["replica"]["lag_s"] is None and report["buffer"]["depth"] == 0
        human = cli_run("status")
        assert human.exit_code == common.DEGRADED and "unavailable" in human.stdout and "replica is down" in human.stdout
    finally:
        migrated.replica.start()
        migrated.replica.wait_streaming()
    assert wait_caught_up(cli_run)["replica"]["lag_bytes"] == 0


def test_status_with_redis_unreachable_exits_degraded_without_a_traceback(cli_run, monkeypatch):
    monkeypatch.setenv("OPSYNC_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()

    result = cli_run("status", "--json")

    assert result.exit_code == common.DEGRADED, result.output
    report = json.loads(result.stdout)
    assert report["buffer"] is None and "redis" in report["unavailable"]
    assert report["replica"]["lag_bytes"] is not None  # the rest still measured
    human = cli_run("status")
    assert human.exit_code == common.DEGRADED and "Traceback" not in human.output and "redis" in human.stdout
    listed = cli_run("dlq", "list")
    assert listed.exit_code == common.UNAVAILABLE and "cannot reach the site buffer (Redis)" in listed.stderr


def test_status_watch_refreshes_until_interrupted(cli_run, monkeypatch):
    naps = []

    def sleep(seconds: float) -> None:  # Ctrl-C during the third wait
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_status.clock, "sleep", sleep)
    result = cli_run("status", "--watch", "--interval", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert naps == [0.5] * 3 and len([json.loads(line) for line in result.stdout.splitlines()]) == 3
    naps.clear()
    assert cli_run("status", "--json", "--watch").exit_code == 0 and naps == [2.0] * 3


def test_site_status_reports_an_unreachable_primary(buffer, replica, migrated):
    far = create_engine(migrated.primary.url().replace(f":{migrated.primary.port}/", f":{free_port()}/"))
    try:
        report = site_status(buffer, far, replica, slot="observatory")
    finally:
        far.dispose()
    assert report.degraded and set(report.unavailable) == {"primary"}
    assert report.buffer is not None and report.lag_bytes is None
    assert report.lag_s is not None  # an upper bound: the time since the last replayed transaction
