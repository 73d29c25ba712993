"""The harness's services are real: the replica streams, Redis is durable, both survive restarts."""

import time

import pytest
import redis

from opsync.health import DURABLE_REDIS, postgres_role, redis_durability


def wait_replayed(replica, lsn: str, timeout: float = 30) -> str:
    """Poll the replica until its replay LSN passes ``lsn`` (compared numerically by PostgreSQL)."""
    deadline = time.monotonic() + timeout
    with replica.connect(autocommit=True) as conn:
        while time.monotonic() < deadline:
            replayed, caught_up = conn.execute("SELECT pg_last_wal_replay_lsn(), pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if caught_up:
                return str(replayed)
            time.sleep(0.05)
    pytest.fail(f"replica did not replay past {lsn} within {timeout}s")


def test_replica_is_a_streaming_standby(pg):
    assert not pg.primary.in_recovery()
    assert pg.replica.in_recovery()
    with pg.primary.connect() as conn:
        slot = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'observatory'").fetchone()
    assert slot == (True,)


def test_committed_row_streams_to_replica(pg):
    with pg.primary.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS streaming_probe (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO streaming_probe VALUES (1, 'from Cologne') ON CONFLICT DO NOTHING")
        commit_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    replayed = wait_replayed(pg.replica, str(commit_lsn))
    with pg.replica.connect() as conn:
        assert conn.execute("SELECT note FROM streaming_probe WHERE id = 1").fetchone() == ("from Cologne",)
        assert conn.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (replayed, str(commit_lsn))).fetchone()[0]


def test_replica_refuses_writes(pg):
    import psycopg

    with pg.replica.connect() as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("CREATE TABLE nope (id int)")


def test_replica_catches_up_after_restart(pg):
    pg.replica.stop()
    with pg.primary.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS while_down (id int)")
        conn.execute("INSERT INTO while_down VALUES (42)")
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    pg.replica.start()
    wait_replayed(pg.replica, str(lsn))
    pg.replica.wait_streaming()
    with pg.replica.connect() as conn:
        assert conn.execute("SELECT id FROM while_down").fetchall() == [(42,)]


def test_primary_survives_kill(pg):
    with pg.primary.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS crash_probe (id int)")
        conn.execute("INSERT INTO crash_probe VALUES (7)")
    pg.primary.kill()
    assert pg.primary.pid() is None
    pg.primary.start()
    with pg.primary.connect() as conn:
        assert conn.execute("SELECT id FROM crash_probe").fetchall() == [(7,)]
    pg.replica.wait_streaming()


def test_redis_is_durable(redis_server):
    with redis_server.client(decode_responses=True) as client:
        for key, value in DURABLE_REDIS.items():
            assert client.config_get(key)[key] == value


def test_redis_keeps_acknowledged_writes_across_kill(redis_server):
    with redis_server.client() as client:
        entry = client.xadd("probe-stream", {"n": "1"})
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        redis_server.client().ping()
    redis_server.start()
    with redis_server.client() as client:
        assert [e[0] for e in client.xrange("probe-stream")] == [entry]


def test_health_checks_tell_primary_from_replica(pg):
    assert postgres_role(pg.primary.conninfo(), expect_recovery=False).ok
    assert postgres_role(pg.replica.conninfo(), expect_recovery=True).ok
    wrong = postgres_role(pg.primary.conninfo(), expect_recovery=True)
    assert not wrong.ok and "not in recovery" in wrong.detail


def test_health_check_flags_a_redis_that_is_not_durable(redis_server):
    with redis_server.client() as client:
        assert redis_durability(client).ok
        client.config_set("appendfsync", "everysec")
        try:
            health = redis_durability(client)
        finally:
            client.config_set("appendfsync", "always")
    assert not health.ok and "appendfsync=everysec" in health.detail


def test_health_check_reports_unreachable_services(pg):
    import redis

    assert "unreachable" in redis_durability(redis.Redis(port=1, socket_timeout=1)).detail
    dead = pg.primary.conninfo().replace(f"port={pg.primary.port}", "port=1")
    assert "unreachable" in postgres_role(dead, expect_recovery=False).detail
