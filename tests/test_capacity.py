"""Seeing an outage coming and going (:mod:`opsync.monitoring.capacity`): the high-water forecast from a real buffer filled at a
known rate, the drain's ETA from a real drain, the forecasts on ``/metrics``, and the replica's slot on a primary with
a small ``max_slot_wal_keep_size`` whose WAL reserve shrinks for real while the replica is stopped, until the slot is
lost and the replica is cloned again as the README says.
"""

import math
import secrets
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from devstack.postgres import REPLICATION_SLOT, Credentials, PostgresServer, provision
from ingest_api import deps
from opsync import drain, sizing
from opsync.buffer import Buffer
from opsync.config import Settings, get_settings
from opsync.ingest import StepIn, build_transaction
from opsync.monitoring.alerts import Level, Thresholds, evaluate
from opsync.monitoring.capacity import MIN_FILL_TXNS, capacity
from opsync.monitoring.drain_metrics import DrainMetrics
from opsync.monitoring.status import site_status
from tests.conftest import PG_BIN, PG_OS_USER, free_port, wait_for
from tests.test_drain import confirm_all

START = datetime(2026, 11, 21, 3, tzinfo=UTC)


def sample(module, n: int) -> StepIn:
    return StepIn(
        table="housekeeping_sample",
        values={
            "instrument_module_id": str(module),
            "sensor": "mixer_temperature",
            "value": 4.2,
            "unit": "K",
            "sampled_at": (START + timedelta(milliseconds=n)).isoformat(),
        },
    )


def fill(buffer: Buffer, module, count: int, rate: float, read=None, first: int = 0) -> float:
    """Buffer ``count`` housekeeping transactions at ``rate`` per second (as the client sends them, with an
    idempotency key), calling ``read()`` every tenth of a second; returns the seconds it took."""
    started = last_read = time.monotonic()
    for i in range(count):
        txn = build_transaction([sample(module, first + i)], "test", idempotency_key=str(uuid.uuid4()))
        buffer.enqueue(txn, {"txn_id": str(txn.txn_id)}, idempotency=("test", txn.idempotency_key))
        ahead = started + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        if read and time.monotonic() - last_read >= 0.1:
            read()
            last_read = time.monotonic()
    return time.monotonic() - started


def used_memory(buffer: Buffer) -> int:
    return buffer.client.info("memory")["used_memory"]


def test_time_to_high_water_from_a_real_buffer_filled_at_a_known_rate(own_redis, planning):
    buffer = Buffer(own_redis.client())
    buffer.client.config_set("maxmemory", 0)  # no memory mark until the test sets one
    settings = Settings(capacity_window_s=60, high_water_entries=10_000)

    empty = capacity(buffer, settings)
    assert empty.ingest_per_s is None and empty.high_water.state == "unknown" and empty.high_water.as_json()["seconds"] is None
    assert empty.high_water.why.startswith("measuring") and empty.drain_eta.state == "now"

    before, started = used_memory(buffer), time.monotonic()
    count, rate = MIN_FILL_TXNS + 200, 400
    fill(buffer, planning["module"], count, rate, read=lambda: capacity(buffer, settings))
    grown, c = used_memory(buffer) - before, capacity(buffer, settings)
    elapsed = time.monotonic() - started

    assert c.ingest_per_s == pytest.approx(count / elapsed, rel=0.15)  # the rate the test achieved on this busy machine
    assert c.bytes_measured_over >= MIN_FILL_TXNS
    assert c.bytes_per_txn == pytest.approx(grown / count, rel=0.2)  # the growth the test measured itself
    assert 300 < c.bytes_per_txn < 10_000
    assert c.room == 10_000 - count and c.high_water.state == "due" and "entries mark" in c.high_water.why
    assert c.high_water.seconds == pytest.approx((10_000 - count) / c.ingest_per_s, rel=0.01)
    assert c.drain_eta.state == "never" and "no drain has applied anything yet" in c.drain_eta.why

    used = used_memory(buffer)  # a limit whose 90% mark lies 1 MB ahead: the memory mark now comes first
    buffer.client.config_set("maxmemory", int((used + 1_000_000) / 0.9))
    tight = capacity(buffer, settings)
    assert tight.high_water.state == "due" and "memory mark" in tight.high_water.why and "measured" in tight.high_water.why
    assert tight.room == pytest.approx(1_000_000 / tight.bytes_per_txn, rel=0.1)
    expected = 1_000_000 / (tight.ingest_per_s * tight.bytes_per_txn)
    assert tight.high_water.seconds == pytest.approx(expected, rel=0.1)

    quiet = Settings(capacity_window_s=1, high_water_entries=10_000)
    time.sleep(1.1)  # every reading of the one-second window is older than the last write
    capacity(buffer, quiet)
    time.sleep(0.2)
    idle = capacity(buffer, quiet)
    assert idle.ingest_per_s == 0 and idle.high_water.state == "never" and idle.room > 0
    assert idle.high_water.as_json() == {"seconds": None, "state": "never", "why": idle.high_water.why}
    assert idle.bytes_per_txn == pytest.approx(c.bytes_per_txn, rel=0.05)  # kept from the fill, though this window saw none


def test_before_bytes_are_measured_the_benchmarks_figure_sizes_the_memory_mark_and_a_mark_reached_is_now(own_redis, planning):
    buffer = Buffer(own_redis.client())
    settings = Settings(capacity_window_s=60, high_water_entries=10_000)
    used = used_memory(buffer)
    buffer.client.config_set("maxmemory", int((used + 2_000_000) / settings.high_water_memory_fraction))
    capacity(buffer, settings)
    fill(buffer, planning["module"], 300, 200)
    c = capacity(buffer, settings)

    assert c.bytes_per_txn is None and "as benchmarked" in c.high_water.why  # 300 are too few to measure
    free = settings.high_water_memory_fraction * buffer.client.info("memory")["maxmemory"] - used_memory(buffer)
    assert c.room == pytest.approx(free // sizing.BUFFERED_TXN_BYTES, abs=2)
    assert c.high_water.seconds == pytest.approx(c.room / c.ingest_per_s, rel=0.01)

    reached = capacity(buffer, Settings(capacity_window_s=60, high_water_entries=300))
    assert (reached.high_water.seconds, reached.room) == (0, 0) and reached.high_water.state == "now"
    assert "holds 300 unsent transactions (high-water mark 300)" in reached.high_water.why  # backpressure's own words
    buffer.client.config_set("maxmemory", 0)


def test_drain_eta_from_a_real_drain_and_zero_once_replicated(own_redis, planning, primary_engine, replica_engine):
    buffer = Buffer(own_redis.client())
    settings = Settings(capacity_window_s=60)
    capacity(buffer, settings)
    fill(buffer, planning["module"], 600, 2000)
    time.sleep(1.1)
    stalled = capacity(buffer, settings)
    assert stalled.drain_eta.seconds == math.inf and stalled.drain_eta.as_json()["seconds"] is None

    buffer.ensure_group()
    done = 0
    for _ in range(3):
        done += drain.drain_batch(buffer, primary_engine, batch_size=100).applied
        confirm_all(buffer, replica_engine)
        capacity(buffer, settings)
    c = capacity(buffer, settings)

    assert done == 300 and c.applied_per_s > 0 and c.finished_per_s > 0
    assert c.drain_eta.state == "due" and c.drain_eta.seconds == pytest.approx(300 / c.finished_per_s, rel=0.01)
    drain.drain(buffer, primary_engine)
    confirm_all(buffer, replica_engine)
    assert capacity(buffer, settings).drain_eta.seconds == 0


def gauges(text: str) -> dict[str, float]:
    return {
        (s.name + "".join(f"{{{k}={v}}}" for k, v in s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_metrics_show_the_forecasts_with_infinity_for_never_and_nothing_for_unknown(own_redis, api_client, planning, monkeypatch):
    monkeypatch.setenv("OPSYNC_CAPACITY_WINDOW_S", "3")
    get_settings.cache_clear()
    buffer = Buffer(own_redis.client())  # the API's buffer: the default prefix
    fill(buffer, planning["module"], 5, 1000)

    first = gauges(api_client.get("/metrics").text)
    time.sleep(0.3)
    second = gauges(api_client.get("/metrics").text)

    assert "opsync_buffer_high_water_eta_seconds" not in first and "opsync_drain_eta_seconds" not in first  # one reading
    assert second["opsync_buffer_ingest_transactions_per_second"] == 0
    assert second["opsync_buffer_high_water_eta_seconds"] == math.inf  # nothing accepted since: never at this rate
    assert second["opsync_drain_eta_seconds"] == math.inf  # 5 wait, nothing drains
    assert second["opsync_replica_slot_up"] == 1 and second["opsync_replica_slot_wal_status{status=reserved}"] == 1
    assert second["opsync_replica_slot_wal_status{status=lost}"] == 0
    assert 0 < second["opsync_replica_slot_safe_wal_bytes"] and second["opsync_replica_slot_max_wal_keep_bytes"] == 10 * 2**30
    assert second["opsync_buffer_high_water_room_transactions"] > 0
    assert "opsync_buffer_transaction_memory_bytes" not in second  # 5 transactions measure nothing: absent, never -1
    ours = {k: v for k, v in second.items() if k.startswith(("opsync_replica_slot", "opsync_buffer_high_water", "opsync_drain_eta"))}
    assert all(v >= 0 for v in ours.values()), ours

    monkeypatch.setenv("OPSYNC_PRIMARY_URL", f"postgresql+psycopg://opsync:x@127.0.0.1:{free_port()}/opsync")
    get_settings.cache_clear()
    deps.get_primary.cache_clear()
    try:
        cut = gauges(api_client.get("/metrics").text)
    finally:
        deps.get_primary.cache_clear()
    assert cut["opsync_replica_slot_up"] == 0 and not any(k.startswith("opsync_replica_slot_wal") for k in cut)
    assert "opsync_drain_eta_seconds" in cut  # the forecasts need Redis only


# --- the replica's slot -------------------------------------------------------------------------------------


@pytest.fixture
def small_slot(service_root):
    """A primary of its own with a streaming replica and ``max_slot_wal_keep_size`` of 64 MB (four WAL segments)."""
    root = service_root / f"small-slot-{secrets.token_hex(4)}"
    credentials = Credentials(password=secrets.token_urlsafe(16), replication_password=secrets.token_urlsafe(16))

    def server(name: str) -> PostgresServer:
        return PostgresServer(name, root / name, free_port(), PG_BIN, PG_OS_USER, credentials)

    primary, replica = server("primary"), server("replica")
    provision(primary, replica)
    with primary.connect("postgres", autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '64MB'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE TABLE ballast (x text)")
    yield primary, replica
    for srv in (replica, primary):
        if srv.pid() is not None:
            srv.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def slot_finding(buffer: Buffer, primary, replica):
    status = site_status(buffer, primary, replica, slot=REPLICATION_SLOT)
    (finding,) = [f for f in evaluate(status, DrainMetrics(), Thresholds()) if f.figure == "replica_slot"]
    return status, finding


def test_the_slot_alert_fires_as_its_wal_reserve_shrinks_and_when_it_is_lost_and_a_clone_restores_it(small_slot, redis_server):
    primary_srv, replica_srv = small_slot
    buffer = Buffer(redis_server.client(), prefix=f"slot-{secrets.token_hex(4)}")
    primary = create_engine(primary_srv.url("postgres"), connect_args={"connect_timeout": 5})
    replica = create_engine(replica_srv.url("postgres"), connect_args={"connect_timeout": 2})
    try:
        status, finding = slot_finding(buffer, primary, replica)
        assert finding.level is Level.ok and status.slot.wal_status == "reserved" and status.slot.active
        assert status.slot.max_keep == 64 * 2**20 and "reserved" in finding.message

        replica_srv.stop()
        seen, reserves = [], []
        with primary_srv.connect("postgres", autocommit=True) as conn:
            for _ in range(40):  # about 2.8 MB of WAL each
                conn.execute("INSERT INTO ballast SELECT repeat('x', 500) FROM generate_series(1, 5000)")
                status, finding = slot_finding(buffer, primary, replica)
                seen.append(finding.level)
                reserves.append(status.slot.safe_wal_size)
                if status.slot.wal_status == "unreserved":
                    break
            assert status.slot.wal_status == "unreserved" and finding.level is Level.critical
            assert "unreserved" in finding.message and "next checkpoint" in finding.message
            conn.execute("CHECKPOINT")
        lost_status, lost = slot_finding(buffer, primary, replica)

        assert reserves[0] > reserves[len(reserves) // 2] > reserves[-2] > 0  # it shrank for real
        first_warn = seen.index(Level.warn)
        assert 0 < first_warn < seen.index(Level.critical) < len(seen) - 1  # warned, then critical, before unreserved
        assert lost_status.slot.wal_status == "lost" and lost.level is Level.critical and "clone the replica again" in lost.message
        assert lost_status.as_json()["replica"]["slot"]["wal_status"] == "lost"

        shutil.rmtree(replica_srv.data_dir)  # the README's recovery: empty the replica, clone it through the same slot
        replica_srv.init_replica(primary_srv)
        replica_srv.start()
        back = wait_for(lambda: (s := slot_finding(buffer, primary, replica)) and s[0].slot.active and s, what="a streaming slot")
        assert back[0].slot.wal_status == "reserved" and back[1].level is Level.ok
    finally:
        primary.dispose()
        replica.dispose()
