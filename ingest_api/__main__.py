"""``python -m ingest_api``: the API under uvicorn as every deployment runs it (``make up``, compose, the benchmark).

Several worker processes, because one Python process saturates below 1,000 requests per second.
Each worker listens on its own ``SO_REUSEPORT`` socket, so the kernel spreads connections evenly:
with uvicorn's ``--workers`` all share one socket, and a burst of keep-alive connections (a
script pool, the benchmark) was accepted by one worker while the other idled. The sockets are
all listening before any worker starts, for the same reason: a pool connecting as soon as the
first worker answered went to it alone, and its keep-alive connections stayed there.

No access log: at that rate it costs a tenth of the CPU and grows without bound; requests are
counted in ``/metrics`` and errors are still logged. Metrics are summed across workers with
prometheus-client's multiprocess mode, so a scrape never sees one worker's counts alone.
"""

import argparse
import gc
import importlib
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from multiprocessing.connection import wait
from pathlib import Path

import uvicorn

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
APP = "ingest_api.app:app"


def fresh_metrics_dir(path: Path | None) -> Path:
    """The directory the workers write their counters to, emptied: old files would add a previous run's counts."""
    path = path or Path(os.environ.get(METRICS_DIR) or tempfile.mkdtemp(prefix="opsync-metrics-"))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[METRICS_DIR] = str(path)  # before the app (and prometheus-client) is imported, here and in workers
    return path


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def worker(sockets: list[socket.socket], index: int, app: str = APP) -> None:
    """One uvicorn process serving ``app`` ("module:attribute"), imported here, after the fork, on
    ``sockets[index]``; it closes its siblings' copies, so a socket dies with its worker."""
    for other in sockets[:index] + sockets[index + 1 :]:
        other.close()
    module, _, attribute = app.partition(":")
    asgi_app = getattr(importlib.import_module(module), attribute)
    quiet_gc()
    config = uvicorn.Config(asgi_app, access_log=False)
    uvicorn.Server(config).run(sockets=[sockets[index]])


def quiet_gc() -> None:
    """Fewer, shorter garbage collections once the app is loaded: its objects (FastAPI's routes, the
    pydantic models, SQLAlchemy's metadata) are moved out of the collector's sight, and a young
    collection runs when allocations outnumber deallocations by 20,000 instead of 700, a mark the
    thousands of objects of a few dozen requests in flight crossed many times a second, each time
    pausing the worker mid-request (``make bench-ingest``: median at 1,000 requests per second
    5.3 -> 3.1 ms). The write path leaves no cyclic garbage (``tests/test_api_hot_path.py``), so
    what is left to collect is little."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def serve(host: str, port: int, workers: int, app: str = APP) -> int:
    """Run the workers until one exits or this process is told to stop; then stop them all.

    A worker that dies takes the others down with it, so the supervisor (supervisord, Docker)
    restarts the whole API instead of it running on quietly at reduced capacity.
    """
    context = multiprocessing.get_context("fork")  # the parent has imported neither the app nor threads
    sockets = [listening_socket(host, port) for _ in range(workers)]
    procs = [context.Process(target=worker, args=(sockets, n, app), name=f"ingest-api-{n}") for n in range(workers)]
    for proc in procs:
        proc.start()
    for sock in sockets:
        sock.close()

    def stop(*_) -> None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # uvicorn shuts down gracefully on SIGTERM

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wait([p.sentinel for p in procs])
    stop()
    for proc in procs:
        proc.join(30)
    return max(abs(p.exitcode or 0) for p in procs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ingest_api", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--metrics-dir", type=Path, help=f"where workers keep their metrics (default ${METRICS_DIR}, else a temporary one)")
    args = parser.parse_args(argv)
    fresh_metrics_dir(args.metrics_dir)
    raise SystemExit(serve(args.host, args.port, args.workers))


if __name__ == "__main__":
    main()
