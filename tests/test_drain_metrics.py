"""The drainer's figures in Redis: counted by real drains into the test primary, read back, and exposed on /metrics.

Real Redis, real PostgreSQL; the cut link is the userspace WAN proxy.
"""

import time
import uuid
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from devstack.wan import WanProxy
from opsync import drain
from opsync.apply import Transient
from opsync.buffer import Buffer
from opsync.buffer.codec import encode
from opsync.envelope import Op, Step, Transaction
from opsync.ids import new_id
from opsync.monitoring import drain_metrics
from opsync.monitoring.alerts import Finding, Level, store_findings
from opsync.monitoring.drain_metrics import BATCH_BUCKETS, ERROR_CLASSES, DrainMetrics, rate_per_minute, record_batch, record_run
from opsync.read_model.publisher import Publisher
from opsync.read_model.store import ReadModel
from tests.test_drain import buffered, engine, observation, raw_file


@pytest.fixture
def buffer(redis_server):
    return Buffer(redis_server.client(), prefix=f"metrics-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def primary(migrated):
    e = engine(migrated.primary.url())
    yield e
    e.dispose()


def figures(buffer: Buffer) -> DrainMetrics:
    return drain_metrics.drain_metrics(buffer.client, buffer)


def test_a_fresh_buffer_has_zero_figures_and_a_zero_filled_hour(buffer):
    m = figures(buffer)

    assert (m.records_applied, m.transactions_applied, m.batches, m.runs, m.failed_runs_consecutive) == (0, 0, 0, 0, 0)
    assert m.errors == {} and m.last_run_age_s is None and m.mean_batch_s is None and m.batch_quantile(0.5) is None
    assert m.batch_buckets == tuple((bound, 0) for bound in BATCH_BUCKETS)
    rate = rate_per_minute(buffer.client, buffer)
    assert len(rate) == 60 and {count for _, count in rate} == {0}
    assert {b[0] - a[0] for a, b in zip(rate, rate[1:], strict=False)} == {60}
    now, _ = buffer.client.time()
    assert rate[-1][0] in (now - now % 60, now - now % 60 - 60)  # the current minute by Redis' clock (it may just have turned)


def test_real_batches_are_counted_with_rows_transactions_round_trips_and_latency(buffer, primary, planning):
    buffered(buffer, observation(planning, ref="o"), raw_file({"$ref": "o"}), raw_file({"$ref": "o"}))
    buffered(buffer, observation(planning))

    summary = drain.drain(buffer, primary)

    m = figures(buffer)
    assert (m.records_applied, m.transactions_applied, m.batches) == (4, 2, 1)
    assert m.round_trips == summary.round_trips == 1
    assert (m.runs, m.runs_failed, m.failed_runs_consecutive, m.errors) == (1, 0, 0, {})
    assert 0 < m.last_batch_s < 5 and m.batch_seconds_sum == pytest.approx(m.last_batch_s)  # HINCRBYFLOAT rounds
    assert m.batch_buckets[-1] == (float("inf"), 1)
    assert m.batch_quantile(0.5) == next(b for b in BATCH_BUCKETS if m.last_batch_s <= b)
    assert 0 <= m.last_run_age_s < 5
    assert [count for _, count in rate_per_minute(buffer.client, buffer, 3)][-2:] in ([0, 4], [4, 0])  # the minute may turn
    drain.drain(buffer, primary)  # nothing to drain: a run, no batch
    assert (figures(buffer).runs, figures(buffer).batches) == (2, 1)


def test_per_minute_buckets_add_up_and_stay_zero_filled(buffer):
    for records in (3, 4):
        record_batch(buffer, records=records, transactions=1, seconds=0.3, round_trips=2)

    rate = rate_per_minute(buffer.client, buffer, 5)

    counts = [c for _, c in rate]
    assert len(rate) == 5 and counts[:3] == [0, 0, 0] and sum(counts) == 7  # in the last minute, or over its turn
    minute_keys = buffer.client.keys(drain_metrics.minute_prefix(buffer) + "*")
    assert len(minute_keys) == 1 and 0 < buffer.client.ttl(minute_keys[0]) <= drain_metrics.MINUTE_TTL_S
    with pytest.raises(ValueError, match="minutes must be between 1 and 1440"):
        rate_per_minute(buffer.client, buffer, 0)


def test_dead_lettered_transactions_are_counted_by_class(buffer, primary, planning):
    bad_reference = buffered(buffer, observation(planning, obs_unit_id=str(uuid.uuid4())))  # foreign key: poison
    buffered(buffer, raw_file(bad_reference.steps[0].key))  # needs the dead one
    buffered(buffer, observation(planning))
    stray = Transaction(
        txn_id=new_id(),
        site="test",
        accepted_at="2026-11-21T03:00:00Z",
        steps=[Step(op=Op.insert, table="no_such_table", key=new_id(), values={})],
    )
    buffer.client.xadd(buffer.stream, {"txn": encode(stray)})

    summary = drain.drain(buffer, primary)

    assert (summary.applied, summary.dead_lettered) == (1, 3)
    m = figures(buffer)
    assert m.errors == {"dependent": 1, "poison": 1, "unreadable": 1}
    assert (m.transactions_applied, m.records_applied, m.runs_failed) == (1, 1, 0)  # the run itself succeeded


def test_a_cut_link_counts_failed_runs_in_a_row_until_one_succeeds(buffer, migrated, planning):
    with WanProxy(migrated.primary.host, migrated.primary.port, delay_s=0.01) as wan:
        far = engine(migrated.primary.url(), port=wan.port, timeout=1)
        try:
            buffered(buffer, observation(planning))
            wan.blackhole()
            for attempt in (1, 2):
                with pytest.raises(Transient):
                    drain.drain(buffer, far, timeout_s=1)
                m = figures(buffer)
                assert (m.failed_runs_consecutive, m.runs_failed, m.last_error_class) == (attempt, attempt, "transient")
            assert m.errors == {"transient": 2} and m.batches == 0

            wan.restore()
            assert drain.drain(buffer, far).applied == 1
        finally:
            far.dispose()
    m = figures(buffer)
    assert (m.failed_runs_consecutive, m.runs, m.runs_failed, m.errors) == (0, 3, 2, {"transient": 2})


def test_unknown_error_classes_count_as_other(buffer):
    record_run(buffer, ok=False, error_class="KeyError")
    record_run(buffer, ok=False)
    record_batch(buffer, records=0, transactions=0, seconds=100, round_trips=1, errors={"mystery": 2, "poison": 0})

    m = figures(buffer)
    assert m.errors == {"other": 4} and m.last_error_class == "other" and m.failed_runs_consecutive == 2
    assert m.batch_buckets[-2] == (60.0, 0) and m.batch_buckets[-1] == (float("inf"), 1)  # 100 s: only in +Inf


def test_metrics_endpoint_exposes_the_drainers_figures(own_redis, api_client, primary, planning):
    buffer = Buffer(own_redis.client())  # the API's buffer: the default prefix
    buffered(buffer, observation(planning, ref="o"), raw_file({"$ref": "o"}))
    buffered(buffer, observation(planning, obs_unit_id=str(uuid.uuid4())))
    drain.drain(buffer, primary)
    record_run(buffer, ok=False, error_class="transient")

    answer = api_client.get("/metrics")

    assert answer.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("opsync_drain_records_applied_total", ())] == 2
    assert value[("opsync_drain_transactions_applied_total", ())] == 1
    assert value[("opsync_drain_round_trips_total", ())] >= 2
    assert value[("opsync_drain_runs_total", ())] == 2 and value[("opsync_drain_runs_failed_total", ())] == 1
    assert value[("opsync_drain_runs_failed_consecutive", ())] == 1
    errors = {dict(labels)["class"]: v for (name, labels), v in value.items() if name == "opsync_drain_errors_total"}
    assert errors == dict.fromkeys(ERROR_CLASSES, 0) | {"poison": 1, "transient": 1}
    assert families["opsync_drain_batch_seconds"].type == "histogram"
    assert value[("opsync_drain_batch_seconds_count", ())] == 1
    assert value[("opsync_drain_batch_seconds_bucket", (("le", "+Inf"),))] == 1
    assert 0 < value[("opsync_drain_batch_seconds_sum", ())] < 5
    assert time.time() - 5 < value[("opsync_drain_last_run_timestamp_seconds", ())] <= time.time() + 1
    assert time.time() - 5 < value[("opsync_last_drain_timestamp_seconds", ())] <= time.time() + 1
    assert value[("opsync_buffer_up", ())] == 1  # the buffer's figures are still there


def test_metrics_endpoint_without_redis_says_the_buffer_is_down_and_still_answers(own_redis, api_client):
    own_redis.stop()
    started = time.monotonic()

    answer = api_client.get("/metrics")

    assert answer.status_code == 200 and time.monotonic() - started < 10
    assert "opsync_buffer_up 0.0" in answer.text and "opsync_drain_" not in answer.text


def test_the_publisher_copies_the_drain_rate_and_the_alert_findings_into_the_read_model(own_redis, site_env, tmp_path):
    buffer = Buffer(own_redis.client())  # the publisher's buffer: the default prefix
    record_batch(buffer, records=12, transactions=4, seconds=0.4, round_trips=2)
    findings = [
        Finding("dead_letters", 1, Level.critical, "dead letters: 1 (critical at 1)"),
        Finding("depth", 0, Level.ok, "buffered transactions: 0"),
    ]
    store_findings(buffer, "2026-11-21T03:00:00+00:00", findings)
    replica = create_engine(site_env.replica_url.get_secret_value())
    publisher = Publisher(ReadModel(tmp_path / "model.db", site_env.timezone), buffer, replica)
    try:
        publisher.record_metrics()
        rate = publisher.model.conn.execute("SELECT minute, records_applied FROM sync_drain_rate ORDER BY minute").fetchall()
        stored = publisher.model.conn.execute("SELECT * FROM sync_findings ORDER BY figure").fetchall()
    finally:
        publisher.close()

    assert len(rate) == 60 and sum(n for _, n in rate) == 12 and {n for _, n in rate[:-2]} == {0}
    now, _ = buffer.client.time()
    minutes = {datetime.fromtimestamp(now - now % 60 - back, UTC).strftime("%Y-%m-%dT%H:%M:00Z") for back in (0, 60)}
    assert rate[-1][0] in minutes  # the current minute (or the one before, if it turned meanwhile)
    assert stored == [
        ("dead_letters", 1, "critical", "dead letters: 1 (critical at 1)", "2026-11-21T03:00:00+00:00"),
        ("depth", 0, "ok", "buffered transactions: 0", "2026-11-21T03:00:00+00:00"),
    ]
