"""The emulated intercontinental link, with a real PostgreSQL behind it: delay, cuts, resets, throughput."""

import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from devstack.wan import WanProxy
from tests.conftest import free_port

ONE_WAY_S = 0.125  # 250 ms round trips, a typical Atacama-Cologne figure


@pytest.fixture
def wan(pg):
    with WanProxy(pg.primary.host, pg.primary.port, delay_s=ONE_WAY_S) as proxy:
        yield proxy


def connect(pg, proxy: WanProxy, **kwargs) -> psycopg.Connection:
    conninfo = psycopg.conninfo.make_conninfo(pg.primary.conninfo(), port=proxy.port)
    return psycopg.connect(conninfo, autocommit=True, **{"connect_timeout": 10, **kwargs})


def round_trip_s(conn: psycopg.Connection, samples: int = 8) -> float:
    timings = []
    for _ in range(samples):
        start = time.perf_counter()
        conn.execute("SELECT 1").fetchone()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def test_a_query_costs_the_configured_round_trip_and_the_delay_can_change(pg, wan):
    with connect(pg, wan) as conn:
        assert 0.25 <= round_trip_s(conn) < 0.45  # generous above: the machine is shared
        wan.set_delay(0.05)
        conn.execute("SELECT 1")  # the reply to this one may still have been sent under the old delay
        assert 0.10 <= round_trip_s(conn) < 0.25


def test_throughput_is_not_one_chunk_per_round_trip(pg, wan):
    row = b"x" * 999 + b"\n"
    with connect(pg, wan) as conn:
        conn.execute("CREATE TEMP TABLE wan_copy (line text)")
        start = time.perf_counter()
        with conn.cursor().copy("COPY wan_copy FROM STDIN") as copy:
            for _ in range(20):
                copy.write(row * 1000)  # 20 MB in 1 MB writes
        elapsed = time.perf_counter() - start
        assert conn.execute("SELECT count(*) FROM wan_copy").fetchone()[0] == 20_000
    # generous: one 64 KiB chunk per round trip would be 80 s; the figure is bench/drain.py's drain_records_per_s_250ms_rtt
    assert elapsed < 20, f"20 MB took {elapsed:.1f} s through a 250 ms link"


def test_a_blackhole_silences_the_link_and_restore_brings_it_back(pg, wan):
    with connect(pg, wan) as conn, ThreadPoolExecutor(1) as pool:
        wan.blackhole()
        held = pool.submit(lambda: conn.execute("SELECT 42").fetchone()[0])
        with pytest.raises(TimeoutError):
            held.result(timeout=1)
        start = time.perf_counter()
        with pytest.raises(psycopg.OperationalError):
            connect(pg, wan, connect_timeout=2)
        assert time.perf_counter() - start < 4  # silence until the client's own timeout, no error from the link

        wan.restore()
        assert held.result(timeout=5) == 42  # held bytes get through, as TCP retransmits after a short cut
    with connect(pg, wan) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reset_breaks_open_connections_only(pg, wan):
    with connect(pg, wan) as conn:
        assert wan.reset_connections() == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with connect(pg, wan) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_refused_target_resets_the_client(pg):
    with WanProxy("127.0.0.1", free_port(), delay_s=0.01) as proxy, pytest.raises(psycopg.OperationalError):
        connect(pg, proxy)


def test_the_command_line_proxy_forwards_until_terminated(pg):
    port = free_port()
    target = f"{pg.primary.host}:{pg.primary.port}"
    args = [sys.executable, "-m", "devstack.wan", "--listen", str(port), "--target", target, "--rtt-ms", "100"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert f"127.0.0.1:{port} -> {target}" in proc.stdout.readline()
        conninfo = psycopg.conninfo.make_conninfo(pg.primary.conninfo(), port=port)
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            assert 0.10 <= round_trip_s(conn, 4) < 0.25  # the configured 100 ms, generous above
    finally:
        proc.terminate()
    assert proc.wait(10) == 0
