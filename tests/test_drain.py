"""Draining the site buffer into the primary exactly once, and confirming against the replica.

Real Redis, real PostgreSQL primary with a streaming replica; the intercontinental link is the
userspace WAN proxy where latency and cuts matter.
"""

import time
import uuid

import pytest
from sqlalchemy import create_engine, make_url, text

from devstack.wan import WanProxy
from opsync import drain, merged, registry
from opsync.apply import Transient
from opsync.buffer import Buffer
from opsync.buffer.codec import decode, encode
from opsync.buffer.figures import buffer_stats
from opsync.envelope import Op, Step, Transaction
from opsync.ids import new_id
from opsync.ingest import StepIn, build_transaction, write_direct
from opsync.lsn import ReplicaUnreachable, current_position

SHA = "ab" * 32


@pytest.fixture
def buffer(redis_server):
    return Buffer(redis_server.client(), prefix=f"drain-{uuid.uuid4().hex[:8]}")


def engine(url: str, port: int | None = None, timeout: int = 5):
    """Engines the drainer uses need a connect timeout: a cut link accepts and never answers."""
    if port is not None:
        url = make_url(url).set(port=port).render_as_string(hide_password=False)
    return create_engine(url, connect_args={"connect_timeout": timeout})


@pytest.fixture
def primary(migrated):
    e = engine(migrated.primary.url())
    yield e
    e.dispose()


@pytest.fixture
def replica(migrated):
    e = engine(migrated.replica.url())
    yield e
    e.dispose()


def buffered(buffer: Buffer, *steps: StepIn) -> Transaction:
    txn = build_transaction(list(steps), "test")
    return enqueued(buffer, txn)


def enqueued(buffer: Buffer, txn: Transaction) -> Transaction:
    """Buffer ``txn`` as built, bypassing ingest validation (as an older site version might have)."""
    buffer.enqueue(txn, {"txn_id": str(txn.txn_id)})
    return txn


def observation(planning, ref=None, **values) -> StepIn:
    return StepIn(
        table="executed_obs_unit",
        ref=ref,
        values={
            "obs_unit_id": str(planning["obs_unit"]),
            "instrument_module_id": str(planning["module"]),
            "start_time": "2026-11-21T03:00:00Z",
        }
        | values,
    )


def raw_file(obs, **values) -> StepIn:
    """A file of observation ``obs`` (its key, or {"$ref": name} of an earlier step)."""
    return StepIn(
        table="raw_data_file",
        values={
            "executed_obs_unit_id": obs if isinstance(obs, dict) else str(obs),
            "path": f"/data/{uuid.uuid4()}.fits",
            "size_bytes": 10,
            "checksum_sha256": SHA,
            "file_type": "fits",
        }
        | values,
    )


def rows_in(primary, table: str, keys) -> int:
    with primary.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table} WHERE id = ANY(:k)"), {"k": [str(k) for k in keys]}).scalar()


def ledger_has(primary, txns) -> int:
    with primary.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM sync_ledger WHERE txn_id = ANY(:t)"), {"t": [str(t.txn_id) for t in txns]}).scalar()


def states(buffer: Buffer, txns) -> list[str]:
    return [s["state"] for s in buffer.statuses([t.txn_id for t in txns])]


def confirm_all(buffer: Buffer, replica, timeout: float = 10) -> int:
    """Confirm until nothing awaits the replica (it replays within a moment here)."""
    deadline, confirmed = time.monotonic() + timeout, 0
    while True:
        confirmation = drain.confirm_replica(buffer, replica)
        confirmed += confirmation.confirmed
        if not confirmation.remaining:
            return confirmed
        assert time.monotonic() < deadline, f"{confirmation.remaining} still await the replica"
        time.sleep(0.02)


def test_drain_applies_settles_and_says_when_there_is_nothing_to_do(buffer, primary, planning):
    obs = buffered(
        buffer,
        observation(planning, ref="obs"),
        StepIn(
            table="raw_data_file",
            values={
                "executed_obs_unit_id": {"$ref": "obs"},
                "path": f"/data/{uuid.uuid4()}",
                "size_bytes": 1,
                "checksum_sha256": SHA,
                "file_type": "fits",
            },
        ),
    )
    obs_id = obs.steps[0].key
    update = buffered(
        buffer,
        StepIn(
            op=Op.update,
            table="executed_obs_unit",
            id=obs_id,
            values={"status": "completed", "end_time": "2026-11-21T04:00:00Z", "metadata": {"tau": 0.05}},
        ),
    )
    samples = buffered(
        buffer,
        *(
            StepIn(
                table="housekeeping_sample",
                values={
                    "instrument_module_id": str(planning["module"]),
                    "sensor": "lo_power",
                    "value": 1.25 + i,
                    "sampled_at": f"2026-11-21T03:00:0{i}Z",
                },
            )
            for i in range(3)
        ),
    )

    summary = drain.drain(buffer, primary)

    assert (summary.batches, summary.applied, summary.duplicates, summary.dead_lettered) == (1, 3, 0, 0)
    assert summary.round_trips == 1 and summary.max_commit_lsn is not None  # ledger, rows and commit sent together
    assert "3 applied" in summary.describe() and str(summary.max_commit_lsn) in summary.describe()
    with primary.connect() as conn:
        row = conn.execute(text("SELECT status, end_time IS NOT NULL, metadata FROM executed_obs_unit WHERE id = :i"), {"i": obs_id}).one()
    assert tuple(row) == ("completed", True, {"tau": 0.05})
    assert rows_in(primary, "housekeeping_sample", [s.key for s in samples.steps]) == 3
    assert ledger_has(primary, [obs, update, samples]) == 3
    statuses = buffer.statuses([t.txn_id for t in (obs, update, samples)])
    assert {s["state"] for s in statuses} == {"committed"}
    assert {s["commit_lsn"] for s in statuses} == {str(summary.max_commit_lsn)}
    assert buffer.client.zscore(buffer.awaiting_replica, str(obs.txn_id)) == float(summary.max_commit_lsn)
    stats = buffer_stats(buffer.client, buffer)
    assert (stats.depth, stats.pending, stats.awaiting_replica, stats.dead_letters) == (0, 0, 3, 0)

    again = drain.drain(buffer, primary)
    assert again.batches == 0 and again.describe() == "nothing to drain: the buffer is empty"


def test_confirm_marks_replicated_releases_overlay_and_is_idempotent(buffer, primary, replica, planning):
    txns = [buffered(buffer, observation(planning)) for _ in range(3)]
    drain.drain(buffer, primary)
    entry = registry.get_table("executed_obs_unit")
    key = txns[0].steps[0].key
    assert merged.get_row(buffer, replica, entry, key)["_sync_state"] == "committed"

    assert confirm_all(buffer, replica) == 3

    assert states(buffer, txns) == ["replicated"] * 3
    assert all(s["replicated_at"] for s in buffer.statuses([t.txn_id for t in txns]))
    assert not buffer.client.exists(buffer.row_key("executed_obs_unit", key))
    assert buffer.client.xlen(buffer.stream) == 0  # entries leave the stream once replicated
    assert merged.get_row(buffer, replica, entry, key)["_sync_state"] == "replicated"
    again = drain.confirm_replica(buffer, replica)
    assert (again.confirmed, again.remaining) == (0, 0)


def overlay_keys(buffer: Buffer) -> list[bytes]:
    return [key for kind in ("row", "rows", "partial", "idx") for key in buffer.client.keys(f"{buffer.prefix}:{kind}:*")]


def test_confirm_releases_every_row_the_entry_wrote_unless_a_later_change_holds_it(buffer, primary, replica, planning):
    """CONFIRM reads the rows from the buffered entry itself: all steps, their field indexes, and nothing newer."""
    obs = buffered(buffer, observation(planning, ref="o"), raw_file({"$ref": "o"}), raw_file({"$ref": "o"}))
    drain.drain(buffer, primary)
    obs_key = obs.steps[0].key
    later = buffered(buffer, StepIn(op=Op.update, table="executed_obs_unit", id=obs_key, values={"status": "completed"}))

    assert confirm_all(buffer, replica) == 1

    assert [key.decode() for key in overlay_keys(buffer) if b":row:" in key] == [buffer.row_key("executed_obs_unit", obs_key)]
    assert buffer.client.hget(buffer.row_key("executed_obs_unit", obs_key), "txn_id").decode() == str(later.txn_id)
    drain.drain(buffer, primary)
    confirm_all(buffer, replica)
    assert overlay_keys(buffer) == [] and buffer.client.xlen(buffer.stream) == 0
    assert states(buffer, [obs, later]) == ["replicated"] * 2


def test_only_transactions_the_replica_has_passed_are_confirmed(buffer, primary, planning):
    first = buffered(buffer, observation(planning))
    lsn_first = drain.drain(buffer, primary).max_commit_lsn
    second = buffered(buffer, observation(planning))
    drain.drain(buffer, primary)
    confirmation = drain.confirm(buffer, lsn_first)
    assert (confirmation.confirmed, confirmation.remaining) == (1, 1)
    assert states(buffer, [first, second]) == ["replicated", "committed"]


def test_a_run_ends_at_its_first_batch_that_is_not_full(buffer, primary, planning, monkeypatch):
    """Under steady ingest the buffer is never empty: a run still ends, so its work is confirmed now, not at the budget."""
    for _ in range(3):
        buffered(buffer, observation(planning))
    claim = buffer.claim

    def claim_while_records_arrive(consumer, count, after="0"):
        entries = claim(consumer, count, after)
        buffered(buffer, observation(planning))
        return entries

    monkeypatch.setattr(buffer, "claim", claim_while_records_arrive)
    summary = drain.drain(buffer, primary, batch_size=2, budget_s=30)

    assert (summary.batches, summary.applied, summary.budget_spent) == (3, 5, False)  # 2, 2, then 1: the run ends
    assert summary.elapsed_s < 10
    assert buffer_stats(buffer.client, buffer).depth == 1  # what arrived during the short batch: the next run's


def test_crash_after_commit_before_ack_redelivers_and_skips(buffer, primary, planning, monkeypatch):
    txns = [buffered(buffer, observation(planning)) for _ in range(4)]

    def crash(*args, **kwargs):
        raise RuntimeError("drainer killed between commit and acknowledgement")

    with monkeypatch.context() as patch:
        patch.setattr(Buffer, "settle", crash)
        with pytest.raises(RuntimeError):
            drain.drain(buffer, primary)
    keys = [t.steps[0].key for t in txns]
    assert rows_in(primary, "executed_obs_unit", keys) == 4
    assert states(buffer, txns) == ["accepted"] * 4
    assert buffer_stats(buffer.client, buffer).pending == 4  # claimed, not acknowledged: nothing lost

    summary = drain.drain(buffer, primary)

    assert (summary.applied, summary.duplicates) == (0, 4)
    assert rows_in(primary, "executed_obs_unit", keys) == 4 and ledger_has(primary, txns) == 4
    statuses = buffer.statuses([t.txn_id for t in txns])
    assert {s["state"] for s in statuses} == {"committed"}
    assert {s["commit_lsn"] for s in statuses} == {str(summary.max_commit_lsn)}  # at or past the lost commit LSN
    assert buffer.client.zcard(buffer.awaiting_replica) == 4
    assert buffer_stats(buffer.client, buffer).pending == 0


def test_a_batch_of_redelivered_and_new_transactions_applies_the_new_ones_once(buffer, primary, planning, monkeypatch):
    """The batch sent whole meets the ledger at its first statement: nothing of it applies, and the ledger's answer decides."""
    redelivered = [buffered(buffer, observation(planning)) for _ in range(2)]
    with monkeypatch.context() as patch:
        patch.setattr(Buffer, "settle", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("killed before the ack")))
        with pytest.raises(RuntimeError):
            drain.drain(buffer, primary)
    new = [buffered(buffer, observation(planning)) for _ in range(2)]

    summary = drain.drain(buffer, primary)

    assert (summary.batches, summary.applied, summary.duplicates, summary.dead_lettered) == (1, 2, 2, 0)
    assert summary.round_trips == 3  # the whole batch, refused; the ledger; the new ones with the commit
    keys = [t.steps[0].key for t in redelivered + new]
    assert rows_in(primary, "executed_obs_unit", keys) == 4 and ledger_has(primary, redelivered + new) == 4
    assert states(buffer, redelivered + new) == ["committed"] * 4


def test_crash_between_claim_and_commit_redelivers(buffer, primary, planning, monkeypatch):
    txns = [buffered(buffer, observation(planning)) for _ in range(3)]
    with monkeypatch.context() as patch:
        patch.setattr(drain, "apply_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError):
            drain.drain(buffer, primary)
    assert rows_in(primary, "executed_obs_unit", [t.steps[0].key for t in txns]) == 0
    later = buffered(buffer, observation(planning))

    summary = drain.drain(buffer, primary, batch_size=2)

    assert (summary.batches, summary.applied, summary.duplicates) == (2, 4, 0)
    assert rows_in(primary, "executed_obs_unit", [t.steps[0].key for t in [*txns, later]]) == 4


def test_entries_of_a_crashed_consumer_are_reclaimed_once_idle(buffer, primary, planning):
    txns = [buffered(buffer, observation(planning)) for _ in range(3)]
    buffer.ensure_group()
    assert len(buffer.claim("crashed-worker", 10)) == 3

    busy = drain.drain(buffer, primary, min_idle_ms=60_000)
    assert (busy.reclaimed, busy.batches) == (0, 0)  # maybe still working: left alone

    time.sleep(0.3)
    summary = drain.drain(buffer, primary, min_idle_ms=200)

    assert (summary.reclaimed, summary.applied) == (3, 3)
    assert states(buffer, txns) == ["committed"] * 3
    assert buffer_stats(buffer.client, buffer).pending == 0


def test_poison_transactions_are_dead_lettered_and_the_rest_commits(buffer, primary, replica, planning):
    good = lambda: buffered(buffer, observation(planning))  # noqa: E731
    taken = f"/data/{uuid.uuid4()}"
    parent = buffered(buffer, observation(planning))
    drain.drain(buffer, primary)
    buffered(buffer, raw_file(parent.steps[0].key, path=taken))
    drain.drain(buffer, primary)

    batch = [good(), good()]
    bad_reference = buffered(buffer, observation(planning, obs_unit_id=str(uuid.uuid4())))
    batch += [bad_reference, good()]
    duplicate_path = buffered(buffer, raw_file(parent.steps[0].key, path=taken))
    check_violation = enqueued(
        buffer,
        Transaction(
            txn_id=new_id(),
            site="test",
            accepted_at="2026-11-21T03:00:00Z",
            steps=[Step(op=Op.insert, table="executed_obs_unit", key=new_id(), values=observation(planning, status="exploded").values)],
        ),
    )
    missing_row = buffered(buffer, StepIn(op=Op.update, table="raw_data_file", id=uuid.uuid4(), values={"size_bytes": 5}))
    file_of_bad = buffered(buffer, raw_file(bad_reference.steps[0].key))
    update_of_bad = buffered(
        buffer, StepIn(op=Op.update, table="executed_obs_unit", id=bad_reference.steps[0].key, values={"status": "completed"})
    )
    batch += [duplicate_path, check_violation, good(), missing_row, file_of_bad, update_of_bad, good()]
    bad = [bad_reference, duplicate_path, check_violation, missing_row, file_of_bad, update_of_bad]
    fine = [t for t in batch if t not in bad]

    summary = drain.drain(buffer, primary)

    assert (summary.batches, summary.applied, summary.dead_lettered) == (1, len(fine), len(bad))
    assert 1 < summary.round_trips <= 2 + 2 * len(bad) * 4  # isolation costs round trips only when something fails
    assert rows_in(primary, "executed_obs_unit", [t.steps[0].key for t in fine]) == len(fine)
    assert ledger_has(primary, fine) == len(fine) and ledger_has(primary, bad) == 0  # a requeue can apply them later
    dead = buffer.client.xrange(buffer.dead_letters)
    assert [f[b"txn_id"].decode() for _, f in dead] == [str(t.txn_id) for t in bad]  # stream order
    reasons = {f[b"txn_id"].decode(): f[b"reason"].decode() for _, f in dead}
    assert "foreign key constraint" in reasons[str(bad_reference.txn_id)]
    assert "uq_raw_data_file_path" in reasons[str(duplicate_path.txn_id)]
    assert "ck_executed_obs_unit_status" in reasons[str(check_violation.txn_id)]
    assert reasons[str(missing_row.txn_id)] == f"update of raw_data_file {missing_row.steps[0].key}: no such row"
    for dependant in (file_of_bad, update_of_bad):
        assert reasons[str(dependant.txn_id)] == f"depends on dead-lettered transaction {bad_reference.txn_id}"
    assert decode(dead[0][1][b"txn"]) == decode(encode(bad_reference))
    statuses = {s["reason"]: s["state"] for s in buffer.statuses([t.txn_id for t in bad])}
    assert set(statuses.values()) == {"failed"} and set(statuses) == set(reasons.values())
    assert states(buffer, fine) == ["committed"] * len(fine)
    row = merged.get_row(buffer, replica, registry.get_table("executed_obs_unit"), bad_reference.steps[0].key)
    assert row["_sync_state"] == "failed"

    later = buffered(buffer, raw_file(bad_reference.steps[0].key))  # in a later batch: still named
    assert drain.drain(buffer, primary).dead_lettered == 1
    assert buffer.status(later.txn_id)["reason"] == f"depends on dead-lettered transaction {bad_reference.txn_id}"
    stats = buffer_stats(buffer.client, buffer)
    assert (stats.depth, stats.dead_letters) == (0, len(bad) + 1)


def test_an_envelope_naming_an_unknown_table_is_dead_lettered(buffer, primary, planning):
    good = buffered(buffer, observation(planning))
    stray = Transaction(
        txn_id=new_id(),
        site="test",
        accepted_at="2026-11-21T03:00:00Z",
        steps=[Step(op=Op.insert, table="no_such_table", key=new_id(), values={})],
    )
    buffer.client.xadd(buffer.stream, {"txn": encode(stray)})  # as no ingest would buffer it

    summary = drain.drain(buffer, primary)

    assert (summary.applied, summary.dead_lettered) == (1, 1)
    assert states(buffer, [good]) == ["committed"]
    ((_, fields),) = buffer.client.xrange(buffer.dead_letters)
    assert "'no_such_table' is not an ingestible table" in fields[b"reason"].decode()


def test_a_repeated_insert_fails_alone_and_the_existing_row_stays_usable(buffer, primary, planning):
    first = buffered(buffer, observation(planning))
    key = first.steps[0].key
    repeated = buffered(buffer, StepIn(**{**observation(planning).model_dump(), "id": key}))  # a client retry with its own id
    update = buffered(buffer, StepIn(op=Op.update, table="executed_obs_unit", id=key, values={"status": "completed"}))

    summary = drain.drain(buffer, primary)

    assert (summary.applied, summary.dead_lettered) == (2, 1)
    assert states(buffer, [first, repeated, update]) == ["committed", "failed", "committed"]
    assert "already exists" in buffer.status(repeated.txn_id)["reason"]


def test_round_trips_do_not_grow_with_the_batch_size(buffer, migrated, planning):
    """A 500-transaction batch (1,500 rows in two tables, interleaved) costs the round trip of a 5-transaction one."""
    rtt = 0.2
    with WanProxy(migrated.primary.host, migrated.primary.port, delay_s=rtt / 2) as wan:
        far = engine(migrated.primary.url(), port=wan.port)
        try:
            with far.connect():
                pass  # the connection (handshake, authentication) is paid once per pool, not per batch

            def timed(n: int):
                for _ in range(n):
                    buffered(buffer, observation(planning, ref="o"), raw_file({"$ref": "o"}), raw_file({"$ref": "o"}))
                started = time.perf_counter()
                report = drain.drain_batch(buffer, far, batch_size=1000)
                return report, time.perf_counter() - started

            buffer.ensure_group()
            small, small_s = timed(5)
            big, big_s = timed(500)
        finally:
            far.dispose()
    print(f"5 txns: {small.round_trips} round trips {small_s:.3f} s; 500 txns: {big.round_trips} round trips {big_s:.3f} s; RTT {rtt} s")
    assert (small.applied, big.applied) == (5, 500)
    assert small.round_trips == big.round_trips == 1
    assert rtt <= small_s  # the link's latency was paid: the figures are bench/drain.py's (round_trips_per_batch, *_250ms_rtt)
    assert big_s < small_s + 20 * rtt  # generous, CPU included on a shared machine; one round trip per statement would be 200 s


def test_a_cut_link_is_transient_and_nothing_is_dead_lettered(buffer, migrated, planning):
    with WanProxy(migrated.primary.host, migrated.primary.port, delay_s=0.01) as wan:
        far = engine(migrated.primary.url(), port=wan.port, timeout=2)
        try:
            buffered(buffer, observation(planning))
            assert drain.drain(buffer, far).applied == 1  # the pool now holds an open connection
            txns = [buffered(buffer, observation(planning)) for _ in range(2)]

            wan.blackhole()
            started = time.monotonic()
            with pytest.raises(Transient, match="did not answer within 1 s"):
                drain.drain(buffer, far, timeout_s=1)
            assert time.monotonic() - started < 5
            with pytest.raises(Transient, match="primary unreachable"):
                drain.drain(buffer, far, timeout_s=1)  # a new connection through the cut link
            stats = buffer_stats(buffer.client, buffer)
            assert (stats.depth, stats.dead_letters) == (2, 0)
            assert states(buffer, txns) == ["accepted"] * 2

            wan.restore()  # the bytes the cut held go through: the whole-batch send may commit now, unacknowledged
            again = drain.drain(buffer, far)
            assert again.applied + again.duplicates == 2  # applied once, then or now: the ledger skips a commit that got through
            assert rows_in(far, "executed_obs_unit", [t.steps[0].key for t in txns]) == 2
            buffered(buffer, observation(planning))
            assert wan.reset_connections() >= 1
            with pytest.raises(Transient, match="primary unavailable"):
                drain.drain(buffer, far)
            assert drain.drain(buffer, far).applied == 1
        finally:
            far.dispose()
    assert buffer_stats(buffer.client, buffer).dead_letters == 0


def test_a_stopped_or_read_only_primary_is_transient(buffer, migrated, planning):
    txn = buffered(buffer, observation(planning))
    migrated.primary.stop()
    try:
        with pytest.raises(Transient, match="primary unreachable"):
            drain.drain(buffer, engine(migrated.primary.url(), timeout=2))
    finally:
        migrated.primary.start()
        migrated.replica.wait_streaming()
    assert states(buffer, [txn]) == ["accepted"]

    with migrated.primary.connect(autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        admin.execute("SELECT pg_reload_conf()")
        try:
            read_only = engine(migrated.primary.url())
            with pytest.raises(Transient, match="SQLSTATE 25006"):
                drain.drain(buffer, read_only)
            read_only.dispose()
        finally:
            admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            admin.execute("SELECT pg_reload_conf()")
    assert buffer_stats(buffer.client, buffer).dead_letters == 0
    writable = engine(migrated.primary.url())
    assert drain.drain(buffer, writable).applied == 1
    writable.dispose()


def test_a_stopped_replica_keeps_transactions_committed_until_it_returns(buffer, primary, replica, migrated, planning):
    txns = [buffered(buffer, observation(planning)) for _ in range(2)]
    drain.drain(buffer, primary)
    migrated.replica.stop()
    try:
        with pytest.raises(ReplicaUnreachable):
            drain.confirm_replica(buffer, replica)
        assert states(buffer, txns) == ["committed"] * 2
    finally:
        migrated.replica.start()
        migrated.replica.wait_streaming()
    replica.dispose()  # pooled connections died with the server
    assert confirm_all(buffer, replica) == 2  # no new write needed
    assert states(buffer, txns) == ["replicated"] * 2


def test_direct_writes_await_the_replica_too(buffer, primary, replica):
    txn = build_transaction([StepIn(table="instrument", values={"name": f"HFA-{uuid.uuid4().hex[:8]}"})], "test")
    answer, _ = write_direct(txn, buffer, primary, None, "")
    assert answer["state"] == "committed"
    assert buffer.client.zscore(buffer.awaiting_replica, str(txn.txn_id)) is not None
    assert confirm_all(buffer, replica) == 1
    assert states(buffer, [txn]) == ["replicated"]


def test_on_the_main_site_confirmation_is_immediate(buffer, primary, planning):
    txn = buffered(buffer, observation(planning))
    drain.drain(buffer, primary)
    assert drain.confirm(buffer, current_position(primary)).confirmed == 1
    assert states(buffer, [txn]) == ["replicated"]


def test_depth_counts_only_unacknowledged_entries_even_after_a_dead_letter_at_the_end_and_drains_are_noted(buffer, primary, planning):
    """Redis 7.0 reports no group lag once an unread entry was deleted; the depth must not fall back to the stream length."""
    for _ in range(2):
        buffered(buffer, observation(planning))
    buffered(buffer, observation(planning, obs_unit_id=str(uuid.uuid4())))  # last in the stream: dead-lettered, deleted
    before = buffer_stats(buffer.client, buffer)
    assert (before.depth, before.last_drain_s, before.last_confirm_s) == (3, None, None)
    drain.drain(buffer, primary)
    figures = buffer_stats(buffer.client, buffer)
    assert (figures.depth, figures.awaiting_replica, figures.dead_letters, figures.oldest_age_s) == (0, 2, 1, 0.0)
    assert figures.last_drain_s < 5 and figures.last_confirm_s is None
    buffered(buffer, observation(planning))
    assert buffer_stats(buffer.client, buffer).depth == 1


def test_over_a_250_ms_link_a_backlog_left_by_an_outage_drains_and_is_confirmed(buffer, migrated, planning, primary, replica):
    """The site keeps accepting while the link is cut; once it is back the backlog goes in one run, then is confirmed."""
    with WanProxy(migrated.primary.host, migrated.primary.port, delay_s=0.125) as wan:
        far = engine(migrated.primary.url(), port=wan.port, timeout=2)
        try:
            wan.blackhole()
            txns = [buffered(buffer, observation(planning)) for _ in range(50)]
            with pytest.raises(Transient, match="primary unreachable"):
                drain.drain(buffer, far, timeout_s=2)
            assert states(buffer, txns) == ["accepted"] * 50

            wan.restore()
            summary = drain.drain(buffer, far)
            assert (summary.applied, summary.batches, summary.round_trips, summary.dead_lettered) == (50, 1, 1, 0)
            confirm_all(buffer, replica)
        finally:
            far.dispose()
    assert states(buffer, txns) == ["replicated"] * 50
    assert rows_in(primary, "executed_obs_unit", [t.steps[0].key for t in txns]) == 50


def test_a_drain_confirms_between_its_batches_what_the_site_can_read_already(buffer, primary, planning):
    """Each batch's window (its commit in flight) confirms the batches before it; the last waits for the confirm task."""
    txns = [buffered(buffer, observation(planning)) for _ in range(6)]

    summary = drain.drain(buffer, primary, batch_size=2, readable=lambda: current_position(primary))

    assert (summary.batches, summary.applied, summary.confirmed) == (3, 6, 4)
    assert states(buffer, txns) == ["replicated"] * 4 + ["committed"] * 2
    assert "4 confirmed replicated meanwhile" in summary.describe()


def test_a_drain_goes_on_when_the_replica_cannot_say_how_far_it_is(buffer, primary, planning):
    txns = [buffered(buffer, observation(planning)) for _ in range(4)]

    asked = []

    def unreachable():
        asked.append(1)
        raise ReplicaUnreachable("replica unreachable: connection refused")

    summary = drain.drain(buffer, primary, batch_size=2, readable=unreachable)

    assert (summary.applied, summary.confirmed, len(asked)) == (4, 0, 1)  # asked once: a replica timing out would slow each batch
    assert states(buffer, txns) == ["committed"] * 4


def test_a_batch_ends_before_the_transaction_over_the_record_cap_and_a_larger_one_goes_alone_whole(buffer, primary, planning):
    """Caps of 4 records: 2+2 | 5 (alone, never split) | 2+2 | 1, applied in stream order, each once."""
    sizes = [2, 2, 5, 2, 2, 1]
    txns = [buffered(buffer, observation(planning, ref="o"), *(raw_file({"$ref": "o"}) for _ in range(n - 1))) for n in sizes]
    batches = []
    apply = drain.apply_batch

    def spy(engine, pending, *args, **kwargs):
        batches.append([len(t.steps) for t in pending])
        return apply(engine, pending, *args, **kwargs)

    drain.apply_batch = spy
    try:
        summary = drain.drain(buffer, primary, batch_size=100, batch_records=4)
    finally:
        drain.apply_batch = apply
    assert batches == [[2, 2], [5], [2, 2], [1]]
    assert (summary.batches, summary.applied, summary.duplicates) == (4, 6, 0)
    assert ledger_has(primary, txns) == 6 and states(buffer, txns) == ["committed"] * 6
    assert buffer_stats(buffer.client, buffer).pending == 0


def test_a_batch_ends_before_the_transaction_over_the_byte_cap_and_a_larger_one_goes_alone_whole(buffer, primary, planning, monkeypatch):
    """A cap of 2.5 small envelopes: s+s | B (alone, whole: its 3 steps) | s+s | s, applied in stream order, each once."""

    def small():
        return build_transaction([observation(planning, metadata={"pad": "s" * 1000})], "test")

    def big():
        return build_transaction(
            [observation(planning, ref="o", metadata={"pad": "B" * 10_000}), raw_file({"$ref": "o"}), raw_file({"$ref": "o"})], "test"
        )

    probe = Buffer(buffer.client, prefix=f"{buffer.prefix}-probe")  # the envelope's size as the stream holds it
    probe.ensure_group()
    probe.enqueue(small(), {})
    [entry] = probe.claim("probe", 1)
    cap = int(2.5 * len(entry.envelope))
    txns = [enqueued(buffer, t) for t in (small(), small(), big(), small(), small(), small())]
    batches = []
    apply = drain.apply_batch

    def spy(engine, pending, *args, **kwargs):
        batches.append([str(t.txn_id) for t in pending])
        return apply(engine, pending, *args, **kwargs)

    monkeypatch.setattr(drain, "apply_batch", spy)
    summary = drain.drain(buffer, primary, batch_size=100, batch_records=100, batch_bytes=cap)

    ids = [str(t.txn_id) for t in txns]
    assert batches == [ids[0:2], ids[2:3], ids[3:5], ids[5:6]]
    assert (summary.batches, summary.applied, summary.duplicates) == (4, 6, 0)
    assert rows_in(primary, "raw_data_file", [s.key for s in txns[2].steps[1:]]) == 2
    assert ledger_has(primary, txns) == 6 and states(buffer, txns) == ["committed"] * 6
    assert buffer_stats(buffer.client, buffer).pending == 0
