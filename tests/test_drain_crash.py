"""A drain process killed (SIGKILL) inside its window: between claim and commit, between commit and acknowledgement,
and with the next batch claimed while the first one commits (the drain's pipelining).

The drain runs as its own process, ``opsync backlog drain``, with a fault point armed through its
environment (:mod:`opsync.fault_points`): the harness waits until the process is blocked at the point,
kills it by pid, reads the primary and Redis, then lets the DAG's drain function take the dead
consumer's entries over. Records go in through the ingest API; real Redis (a fresh one), the real
primary and its streaming replica.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from sqlalchemy import create_engine, text

from opsync import drain
from opsync.buffer import Buffer
from opsync.connections import Timeouts, engine_options
from tests.records import observation_with_file

OPSYNC = Path(sys.executable).with_name("opsync")  # the installed entry point of this venv
TXNS = 6  # transactions buffered, each an observation and a file of it: one batch
IDLE_MS = 200  # the take-over reclaims entries idle this long (the DAG waits a minute)


@pytest.fixture
def buffer(own_redis):
    """The buffer the CLI and the API use: the settings' Redis, default prefix."""
    return Buffer(own_redis.client())


@pytest.fixture
def primary(site_env):
    """An engine as the DAG's drain task makes one (connect timeout, autocommit: apply_batch's alone)."""
    engine = create_engine(site_env.primary_url.get_secret_value(), **engine_options(Timeouts(5), autocommit=True))
    yield engine
    engine.dispose()


@pytest.fixture
def posted(own_redis, api_client, auth_headers, planning):
    """TXNS transactions accepted by the API (202): their txn_ids, the observations' and the files' keys."""
    headers = auth_headers("executed_obs_unit", "raw_data_file")
    txns = []
    for _ in range(TXNS):
        steps = observation_with_file(
            {
                "obs_unit_id": str(planning["obs_unit"]),
                "instrument_module_id": str(planning["module"]),
                "start_time": "2026-11-21T03:00:00Z",
            }
        )
        response = api_client.post("/v1/transactions", json={"steps": steps}, headers=headers)
        assert response.status_code == 202, response.text
        txns.append(response.json())
    return {
        "txn_ids": [t["txn_id"] for t in txns],
        "obs": [t["ids"][0] for t in txns],
        "files": [t["ids"][1] for t in txns],
        "status_urls": [t["status_url"] for t in txns],
        "headers": headers,
        "obs_unit": str(planning["obs_unit"]),
    }


def kill_at(point: str, tmp_path: Path, batch: int = 1000, before_kill=lambda: None) -> str:
    """Start ``opsync backlog drain`` armed at ``point``, SIGKILL it (by pid) once it is blocked there and
    ``before_kill`` has returned; its consumer name."""
    signal_file = tmp_path / f"{point}.pid"
    env = {**os.environ, "OPSYNC_FAULT_POINT": point, "OPSYNC_FAULT_SIGNAL": str(signal_file)}
    proc = subprocess.Popen(
        [str(OPSYNC), "backlog", "drain", "--batch", str(batch)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: signal_file.exists() or proc.poll() is not None, timeout=60, what=f"the drain to reach {point}")
        assert proc.poll() is None, f"the drain ended before {point}: {proc.communicate()}"
        assert int(signal_file.read_text()) == proc.pid
        before_kill()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    return f"cli-{os.uname().nodename}-{proc.pid}"


def pending(buffer: Buffer) -> list[dict]:
    return buffer.client.xpending_range(buffer.stream, buffer.group, "-", "+", 1000)


def take_over(buffer: Buffer, primary) -> drain.DrainSummary:
    """The DAG's drain function, once the dead consumer's entries have been idle long enough to be reclaimed."""
    wait_for(lambda: all(p["time_since_delivered"] >= IDLE_MS for p in pending(buffer)), timeout=10, what="idle entries")
    return drain.drain(buffer, primary, min_idle_ms=IDLE_MS)


def count(engine, sql: str, **params) -> int:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def rows(engine, posted: dict) -> tuple[int, int]:
    """Observations of this test's planned unit and files of them, counted by content, not by the keys sent."""
    return (
        count(engine, "SELECT count(*) FROM executed_obs_unit WHERE obs_unit_id = :u", u=posted["obs_unit"]),
        count(
            engine,
            "SELECT count(*) FROM raw_data_file f JOIN executed_obs_unit o ON o.id = f.executed_obs_unit_id WHERE o.obs_unit_id = :u",
            u=posted["obs_unit"],
        ),
    )


def ledger(engine, posted: dict) -> list[tuple[str, int]]:
    """(txn_id, the PostgreSQL transaction that applied it) of this test's transactions in the primary's ledger."""
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text("SELECT txn_id::text, db_txid FROM sync_ledger WHERE txn_id = ANY(CAST(:t AS uuid[])) ORDER BY txn_id"),
                {"t": posted["txn_ids"]},
            )
        ]


def states(buffer: Buffer, posted: dict) -> list[str]:
    return [s["state"] for s in buffer.statuses(posted["txn_ids"])]


def replicated_through_the_api(api_client, buffer: Buffer, replica_engine, posted: dict) -> list[str]:
    """Confirm until nothing awaits the replica, then each transaction's state as its status URL gives it."""
    wait_for(
        lambda: not drain.confirm_replica(buffer, replica_engine).remaining,
        timeout=20,
        interval=0.05,
        what="the replica to replay the commit",
    )
    return [api_client.get(url, headers=posted["headers"]).json()["state"] for url in posted["status_urls"]]


def test_kill_after_commit_before_ack_redelivers_and_the_ledger_skips_every_transaction(
    tmp_path, buffer, posted, primary, api_client, replica_engine
):
    dead = kill_at("after_commit", tmp_path)

    assert rows(primary, posted) == (TXNS, TXNS)  # the batch committed in the primary...
    applied = ledger(primary, posted)
    assert len(applied) == TXNS and len({txid for _, txid in applied}) == 1  # ...in one DB transaction
    assert states(buffer, posted) == ["accepted"] * TXNS  # ...and was never acknowledged in Redis
    assert [(p["consumer"].decode(), p["times_delivered"]) for p in pending(buffer)] == [(dead, 1)] * TXNS

    summary = take_over(buffer, primary)

    assert (summary.reclaimed, summary.applied, summary.duplicates, summary.dead_lettered) == (TXNS, 0, TXNS, 0)
    assert rows(primary, posted) == (TXNS, TXNS)  # no duplicate row
    assert ledger(primary, posted) == applied  # every transaction skipped: still as the killed process applied it
    assert pending(buffer) == [] and buffer.client.xlen(buffer.dead_letters) == 0
    statuses = buffer.statuses(posted["txn_ids"])
    assert {(s["state"], s["commit_lsn"]) for s in statuses} == {("committed", str(summary.max_commit_lsn))}
    assert replicated_through_the_api(api_client, buffer, replica_engine, posted) == ["replicated"] * TXNS
    assert rows(replica_engine, posted) == (TXNS, TXNS)


def test_kill_between_claim_and_commit_redelivers_and_applies_each_transaction_once(
    tmp_path, buffer, posted, primary, api_client, replica_engine
):
    dead = kill_at("after_claim", tmp_path)

    assert rows(primary, posted) == (0, 0) and ledger(primary, posted) == []  # nothing reached the primary
    assert states(buffer, posted) == ["accepted"] * TXNS
    assert [(p["consumer"].decode(), p["times_delivered"]) for p in pending(buffer)] == [(dead, 1)] * TXNS  # claimed, kept

    summary = take_over(buffer, primary)

    assert (summary.reclaimed, summary.applied, summary.duplicates, summary.dead_lettered) == (TXNS, TXNS, 0, 0)
    assert rows(primary, posted) == (TXNS, TXNS)
    assert [txn_id for txn_id, _ in ledger(primary, posted)] == sorted(posted["txn_ids"])
    assert pending(buffer) == [] and buffer.client.xlen(buffer.dead_letters) == 0
    assert replicated_through_the_api(api_client, buffer, replica_engine, posted) == ["replicated"] * TXNS
    assert rows(replica_engine, posted) == (TXNS, TXNS)


def test_kill_with_the_next_batch_claimed_while_the_first_commits_applies_each_transaction_once(
    tmp_path, buffer, posted, primary, api_client, replica_engine
):
    first, second = posted["txn_ids"][: TXNS // 2], posted["txn_ids"][TXNS // 2 :]

    def first_committed() -> None:  # the first batch's commit was in flight when the second was claimed: let it land
        wait_for(lambda: len(ledger(primary, posted)) == len(first), timeout=30, what="the first batch's commit")

    dead = kill_at("next_claimed", tmp_path, batch=TXNS // 2, before_kill=first_committed)

    killed = ledger(primary, posted)
    assert sorted(txn_id for txn_id, _ in killed) == sorted(first)  # the first batch committed, alone...
    assert rows(primary, posted) == (TXNS // 2, TXNS // 2)
    assert states(buffer, posted) == ["accepted"] * TXNS  # ...neither batch was acknowledged...
    assert [(p["consumer"].decode(), p["times_delivered"]) for p in pending(buffer)] == [(dead, 1)] * TXNS  # ...both claimed

    summary = take_over(buffer, primary)

    assert (summary.reclaimed, summary.applied, summary.duplicates, summary.dead_lettered) == (TXNS, TXNS // 2, TXNS // 2, 0)
    assert rows(primary, posted) == (TXNS, TXNS)  # no duplicate, nothing lost
    after = dict(ledger(primary, posted))
    assert {t: after[t] for t in first} == dict(killed)  # the first batch skipped: as the killed process applied it
    assert sorted(after) == sorted(posted["txn_ids"]) and {after[t] for t in second}.isdisjoint(after[t] for t in first)
    assert pending(buffer) == [] and buffer.client.xlen(buffer.dead_letters) == 0
    assert replicated_through_the_api(api_client, buffer, replica_engine, posted) == ["replicated"] * TXNS
    assert rows(replica_engine, posted) == (TXNS, TXNS)
