"""The API as deployments run it (``python -m ingest_api``): several workers behind one port."""

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from bench.ingest import wait_ready
from tests.conftest import free_port, wait_for

TABLE = "housekeeping_sample"


@contextmanager
def started(module: str, tmp_path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``python -m <module> --workers 2`` on a free port (``proc.port``), stopped afterwards."""
    port = free_port()
    log_path = tmp_path / f"{module}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port), "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    proc.port, proc.url, proc.log_path = port, f"http://127.0.0.1:{port}", log_path
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)


@contextmanager
def running(module: str, tmp_path, env: dict[str, str]) -> Iterator[str]:
    """:func:`started`; yields its URL once ``/readyz`` answers."""
    with started(module, tmp_path, env) as proc:
        try:
            wait_ready(proc)
        except RuntimeError:
            pytest.fail(proc.log_path.read_text())
        yield proc.url


@pytest.fixture
def served(site_env, tmp_path):
    """``python -m ingest_api --workers 2`` with this test's settings and a metrics dir an earlier run left."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_stale.db").write_bytes(b"left by an earlier run")
    with running("ingest_api", tmp_path, {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}) as url:
        yield url


def posts_counted(metrics: str) -> float:
    pattern = r'opsync_http_requests_total\{method="POST",route="/v1/records/\{table\}",status="202"\} (\S+)'
    return sum(float(value) for value in re.findall(pattern, metrics))


def test_metrics_sum_every_worker_and_start_from_zero(served, issue_token, planning, tmp_path):
    headers = {"Authorization": f"Bearer {issue_token([f'write:{TABLE}'])}"}
    sample = {"instrument_module_id": str(planning["module"]), "sensor": "lo_power", "value": 1.0}
    with httpx.Client(base_url=served, headers=headers) as client:
        for second in range(30):  # new connections: SO_REUSEPORT spreads them over both workers
            response = httpx.post(
                f"{served}/v1/records/{TABLE}", json=sample | {"sampled_at": f"2026-11-21T03:00:{second:02d}Z"}, headers=headers
            )
            assert response.status_code == 202, response.text
        scrapes = [client.get("/metrics").text for _ in range(6)]
    assert [posts_counted(text) for text in scrapes] == [30.0] * 6
    counting = {path.name for path in (tmp_path / "metrics").glob("counter_*.db")}
    assert len(counting) == 2, f"the kernel should spread 30 connections over both workers' sockets: {counting}"
    assert "opsync_buffer_depth" in scrapes[0]


def test_connections_made_while_workers_start_are_spread_over_all_of_them(site_env, tmp_path):
    """Every worker's socket listens before any worker has loaded the app: connections made meanwhile
    wait in the backlogs and the kernel spreads them. A pool that connected as soon as the first
    worker answered used to go to it alone, and keep-alive kept it there."""
    metrics = tmp_path / "metrics"
    with started("ingest_api", tmp_path, {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}) as proc:
        pool = [wait_for(lambda: connect(proc.port), timeout=30, what="the port to accept")]
        pool += [connect(proc.port) for _ in range(39)]
        for conn in pool:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        answers = [b"".join(iter(lambda conn=conn: conn.recv(65536), b"")) for conn in pool]
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers
        answering = {path.name for path in metrics.glob("counter_*.db")}
        assert len(answering) == 2, f"both workers should have answered some of 40 connections: {answering}"


def connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=30)
    except ConnectionRefusedError:
        return None


def test_the_benchmark_floor_is_served_like_the_api_and_writes_each_post(site_env, redis_server, tmp_path):
    """``bench/floor.py``, the benchmark's baseline, runs on the API's server code and makes the one durable write it claims."""
    client = redis_server.client()
    before = client.xlen("floor:stream")
    with running("bench.floor", tmp_path, dict(os.environ)) as url:
        answers = [httpx.post(f"{url}/v1/records/{TABLE}", content=f'{{"n": {n}}}'.encode()) for n in range(20)]
    assert [answer.status_code for answer in answers] == [202] * 20
    entries = client.xrange("floor:stream")[before:]
    assert [fields[b"txn"] for _, fields in entries] == [f'{{"n": {n}}}'.encode() for n in range(20)]
    client.delete("floor:stream", *client.keys("floor:status:*"))
