"""Poison rows: a row the publisher cannot render or write is skipped, logged once, counted and listed; every
other change keeps flowing, in every duty that renders rows. Against the real replica, Redis and SQLite file.

The poison is real: rows written at the main site by plain SQL that PostgreSQL holds but the publisher cannot
show (JSON nested deeper than Python decodes), and buffered values an older site version could have accepted
(a time before year 1 in UTC, an integer beyond SQLite's 64 bits), buffered as built, without ingest's checks.
"""

import json
import logging
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from opsync import cli, drain
from opsync.envelope import Op, Step, Transaction
from opsync.ids import new_id
from opsync.lsn import current_position, replica_position
from opsync.read_model.figures import read_model_figures
from opsync.read_model.publisher import Publisher
from opsync.read_model.store import ReadModel
from tests import test_publisher
from tests.conftest import wait_for
from tests.test_drain import buffered, enqueued
from tests.test_drain import observation as step_of
from tests.test_publisher import FAST, TABLE, confirm_all

model_path, start_publisher = test_publisher.model_path, test_publisher.start_publisher  # fixtures shared with those tests
replica, buffer, reader = test_publisher.replica, test_publisher.buffer, test_publisher.reader

DEEP = "{" + '"a":{' * 3000 + '"b":1' + "}" * 3001  # jsonb takes it; Python's json stops at about 1,000 levels


@pytest.fixture
def publisher(reader, buffer, replica, site_env):
    """A publisher whose duties the test calls one by one (no loop), its file fully loaded."""
    made = Publisher(ReadModel(reader.path, site_env.timezone), buffer, replica, None, replace(FAST, chunk=50))
    yield made
    made.close()


@pytest.fixture
def main_site(migrated, primary_engine, replica, planning):
    """Plain SQL at the main site: ``write(sql, params)`` returns once the replica has it; rows written are
    deleted afterwards, so no poison outlives the test (the databases serve the whole session)."""
    written: list[uuid.UUID] = []

    def write(start_time: str = "2026-11-21T05:00:00Z", metadata: str = "{}", key: uuid.UUID | None = None) -> str:
        key = key or uuid.uuid4()
        with migrated.primary.connect() as conn:
            conn.execute(
                "INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time, metadata)"
                " VALUES (%s, %s, %s, %s, %s::jsonb)",
                (key, planning["obs_unit"], planning["module"], start_time, metadata),
            )
        written.append(key)
        replayed()
        return str(key)

    def sql(statement: str, params=()) -> None:
        with migrated.primary.connect() as conn:
            conn.execute(statement, params)
        replayed()

    def replayed() -> None:
        target = current_position(primary_engine)
        wait_for(lambda: replica_position(replica) >= target, what="the replica")

    write.sql, write.written = sql, written
    yield write
    with migrated.primary.connect() as conn:
        conn.execute("DELETE FROM executed_obs_unit WHERE id = ANY(%s)", (written,))


def poison_txn(planning, **values) -> Transaction:
    """One buffered insert of an observation with ``values``, as built: no ingest validation."""
    row = {
        "obs_unit_id": str(planning["obs_unit"]),
        "instrument_module_id": str(planning["module"]),
        "start_time": "2026-11-21T03:00:00Z",
    } | values
    return Transaction(
        txn_id=new_id(), site="test", accepted_at=datetime.now(UTC), steps=[Step(op=Op.insert, table=TABLE, key=new_id(), values=row)]
    )


def skipped(publisher: Publisher, key) -> tuple[str, str] | None:
    found = publisher.poisoned.get((TABLE, str(key)))
    return found and (found.duty, found.reason)


def warnings_about(caplog, key) -> int:
    return sum(f"skipping {TABLE} {key}" in r.getMessage() for r in caplog.records)


def test_the_full_load_skips_a_row_it_cannot_decode_and_loads_the_rest(publisher, reader, main_site, caplog):
    caplog.set_level(logging.WARNING, logger="opsync.publisher")
    before, bad = main_site(), main_site(metadata=DEEP)
    year_one, far = main_site(start_time="0001-01-01T00:00:00Z"), main_site(start_time="20000-01-01T00:00:00Z")
    after = main_site()

    publisher.follow_replica()  # the first run: the full load

    assert all(reader.row(TABLE, key) for key in (before, after, year_one, far))
    assert reader.row(TABLE, year_one)["night"] is None and reader.row(TABLE, far)["night"] is None
    assert reader.row(TABLE, bad) is None
    duty, reason = skipped(publisher, bad)
    assert duty == "full load" and reason.startswith("RecursionError: maximum recursion depth")
    assert publisher.position() is not None, "loaded: changes are followed from here on"
    assert warnings_about(caplog, bad) == 1


def test_replica_changes_flow_past_a_poison_row_which_is_published_once_it_changes(publisher, reader, main_site, caplog):
    publisher.follow_replica()
    caplog.set_level(logging.WARNING, logger="opsync.publisher")
    bad, good = main_site(metadata=DEEP), main_site()
    position = publisher.position()

    while publisher.follow_replica():
        pass

    assert reader.row(TABLE, good)["_sync_state"] == "replicated" and reader.row(TABLE, bad) is None
    assert skipped(publisher, bad)[0] == "replica changes"
    assert publisher.position().xid > position.xid, "the position moved past the poison row"
    later = main_site()
    for _ in range(3):
        publisher.follow_replica()
    assert reader.row(TABLE, later) and warnings_about(caplog, bad) == 1 and publisher.poison_new == 1

    main_site.sql("UPDATE executed_obs_unit SET metadata = '{\"fixed\": true}' WHERE id = %s", (bad,))
    publisher.follow_replica()
    assert reader.row(TABLE, bad)["metadata"] == '{"fixed":true}' and skipped(publisher, bad) is None


def test_the_buffer_stream_flows_past_rows_it_cannot_render_or_write(publisher, reader, buffer, planning):
    publisher.follow_replica()
    year_zero = enqueued(buffer, poison_txn(planning, start_time="0001-01-01T00:00:00+05:00"))  # 1 BC in UTC
    huge = enqueued(
        buffer,
        Transaction(
            txn_id=new_id(),
            site="test",
            accepted_at=datetime.now(UTC),
            steps=[
                Step(
                    op=Op.insert,
                    table="raw_data_file",
                    key=new_id(),
                    values={
                        "path": f"/data/{uuid.uuid4()}.fits",
                        "size_bytes": 2**70,
                        "checksum_sha256": "0" * 64,
                        "file_type": "fits",
                        "executed_obs_unit_id": str(uuid.uuid4()),
                    },
                )
            ],
        ),
    )
    good = buffered(buffer, step_of(planning))

    publisher.follow_buffer()

    assert reader.row(TABLE, good.steps[0].key)["_sync_state"] == "buffered"
    assert reader.row(TABLE, year_zero.steps[0].key) is None and reader.row("raw_data_file", huge.steps[0].key) is None
    assert skipped(publisher, year_zero.steps[0].key) == ("buffer", "OverflowError: date value out of range")
    assert publisher.poisoned[("raw_data_file", str(huge.steps[0].key))].reason.startswith("OverflowError: Python int too large")
    last = buffer.client.xrevrange(buffer.stream, count=1)[0][0].decode()
    assert publisher.model.get_state("stream") == last, "the stream position moved past them"
    assert publisher.follow_buffer() is False and publisher.poison_new == 2


def test_state_events_flow_past_a_row_gone_poison_on_the_replica(publisher, reader, buffer, planning, primary_engine, replica, main_site):
    publisher.follow_replica()
    txn = buffered(buffer, step_of(planning), step_of(planning))
    first, second = (str(step.key) for step in txn.steps)
    main_site.written.extend(step.key for step in txn.steps)
    publisher.follow_buffer()
    assert drain.drain(buffer, primary_engine).applied == 1
    confirm_all(buffer, replica)  # replicated: the overlay is released, the rows are read from the replica now
    main_site.sql("UPDATE executed_obs_unit SET metadata = %s::jsonb WHERE id = %s", (DEEP, second))
    publisher.state_events = {str(txn.txn_id)}

    publisher.follow_buffer()

    assert reader.row(TABLE, first)["_sync_state"] == "replicated"
    assert reader.row(TABLE, second)["_sync_state"] == "buffered", "left as it was last published"
    assert skipped(publisher, second)[0] == "state events" and not publisher.state_events


def test_the_sweep_passes_a_poison_row_quietly_each_round(publisher, reader, buffer, planning, caplog):
    publisher.follow_replica()
    caplog.set_level(logging.WARNING, logger="opsync.publisher")
    bad = enqueued(buffer, poison_txn(planning, start_time="0001-01-01T00:00:00+05:00")).steps[0].key
    good = buffered(buffer, step_of(planning)).steps[0].key
    with publisher.model.transaction() as conn:  # their wake-ups were lost: only the sweep can find them
        publisher.model.set_state(conn, "stream", buffer.client.xrevrange(buffer.stream, count=1)[0][0].decode())

    for _ in range(3):
        publisher.sweep()

    assert reader.row(TABLE, good)["_sync_state"] == "buffered" and reader.row(TABLE, bad) is None
    assert skipped(publisher, bad)[0] == "sweep" and warnings_about(caplog, bad) == 1


def test_replay_rewrites_the_range_but_its_poison_rows(publisher, reader, main_site):
    publisher.follow_replica()
    since = datetime.now(UTC)
    bad, good = main_site(metadata=DEEP), main_site()

    done = publisher.replay(since, datetime.now(UTC) + timedelta(seconds=5), [TABLE])

    assert reader.row(TABLE, good)["_sync_state"] == "replicated" and reader.row(TABLE, bad) is None
    assert (done.keys[TABLE], done.written[TABLE], done.skipped[TABLE]) == (2, 1, 1)
    assert skipped(publisher, bad)[0] == "replay"


def test_poison_rows_and_freshness_are_figures_in_redis_and_in_the_file(publisher, reader, buffer, replica, planning, main_site):
    publisher.follow_replica()
    publisher.record_metrics()
    caught_up = read_model_figures(buffer, replica)
    assert (caught_up.freshness_s, caught_up.poison_rows, caught_up.poison_skipped) == (0.0, 0, 0)

    bad = main_site(metadata=DEEP)
    buffered(buffer, step_of(planning))
    time.sleep(0.3)
    behind = read_model_figures(buffer, replica)
    assert behind.stream_age_s >= 0.3 and behind.changes_age_s >= 0.3, "unpublished changes age"

    while publisher.follow_replica() or publisher.follow_buffer():
        pass
    publisher.record_metrics()
    now = read_model_figures(buffer, replica)
    assert (now.freshness_s, now.poison_rows, now.poison_skipped) == (0.0, 1, 1)
    assert (now.recent[0].table, now.recent[0].key, now.recent[0].duty) == (TABLE, bad, "replica changes")
    sample = reader.query("SELECT * FROM sync_metrics ORDER BY at DESC LIMIT 1")[0]
    assert (sample["poison_rows"], sample["poison_skipped"], sample["read_model_freshness_s"]) == (1, 1, 0.0)
    assert [(r["table_name"], r["key"], r["duty"]) for r in reader.query("SELECT * FROM sync_poison")] == [(TABLE, bad, "replica changes")]

    main_site.sql("DELETE FROM executed_obs_unit WHERE id = %s", (bad,))  # a deleted row is no poison either
    publisher.follow_replica()
    publisher.record_metrics()
    assert (read_model_figures(buffer, replica).poison_rows, reader.query("SELECT * FROM sync_poison")) == (0, [])


def test_a_restarted_publisher_keeps_listing_the_rows_skipped_before(publisher, buffer, replica, reader, site_env, main_site):
    publisher.follow_replica()
    bad = main_site(metadata=DEEP)
    publisher.follow_replica()
    publisher.record_metrics()
    publisher.close()

    again = Publisher(ReadModel(reader.path, site_env.timezone), buffer, replica, None, FAST)
    try:
        again.record_metrics()
        figures = read_model_figures(buffer, replica)
        assert (figures.poison_rows, figures.poison_skipped) == (1, 1) and figures.recent[0].key == bad
    finally:
        again.close()


def test_freshness_grows_while_no_publisher_runs(buffer, replica, planning, main_site, publisher):
    publisher.follow_replica()  # a position saved, then the publisher stops
    main_site()
    buffered(buffer, step_of(planning))
    first = read_model_figures(buffer, replica).freshness_s
    time.sleep(0.5)
    assert read_model_figures(buffer, replica).freshness_s >= first + 0.4 > 0.4


def test_a_running_publisher_shows_the_year_one_observation_and_everything_after_it(start_publisher, reader, main_site):
    start_publisher()
    year_one, bad, good = main_site(start_time="0001-01-01T00:00:00Z"), main_site(metadata=DEEP), main_site()

    row = wait_for(lambda: reader.row(TABLE, good), what="the row after the poison")
    assert row["_sync_state"] == "replicated"
    assert reader.row(TABLE, year_one)["night"] is None and reader.row(TABLE, bad) is None
    sample = wait_for(lambda: reader.query("SELECT * FROM sync_poison"), what="the poison row listed")
    assert [(r["key"], r["duty"]) for r in sample] == [(bad, "replica changes")]


def test_opsync_status_and_metrics_show_the_poison_rows_and_freshness(publisher, buffer, main_site, api_client):
    publisher.follow_replica()
    bad = main_site(metadata=DEEP)
    publisher.follow_replica()
    publisher.record_metrics()
    runner = CliRunner()

    shown = json.loads(runner.invoke(cli.main, ["status", "--json"], catch_exceptions=False).stdout)["read_model"]
    human = runner.invoke(cli.main, ["status"], catch_exceptions=False).stdout
    scraped = {s.name: s.value for f in text_string_to_metric_families(api_client.get("/metrics").text) for s in f.samples}

    assert (shown["poison_rows"], shown["poison_skipped"], shown["freshness_s"]) == (1, 1, 0.0)
    assert [(p["table"], p["key"], p["duty"]) for p in shown["recent_poison"]] == [(TABLE, bad, "replica changes")]
    assert shown["recent_poison"][0]["reason"].startswith("RecursionError")
    assert "1 now (1 since counting began)" in human and bad in human and "0.0 s behind" in human
    assert scraped["opsync_read_model_poison_rows"] == 1 and scraped["opsync_read_model_poison_skipped_total"] == 1
    assert scraped["opsync_read_model_freshness_seconds"] == 0
