"""``python -m ingest_api``: the API under uvicorn as every deployment runs it (``make up``, compose, the benchmark).

Several workers, because one Python process saturates below 1,000 requests per second. No access
log: at that rate it costs a tenth of the CPU and grows without bound; requests are counted in
``/metrics`` and errors are still logged. Metrics are summed across workers with
prometheus-client's multiprocess mode, so a scrape never sees one worker's counts alone.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def fresh_metrics_dir(path: Path | None) -> Path:
    """The directory the workers write their counters to, emptied: old files would add a previous run's counts."""
    path = path or Path(os.environ.get(METRICS_DIR) or tempfile.mkdtemp(prefix="opsync-metrics-"))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[METRICS_DIR] = str(path)  # before the app (and prometheus-client) is imported, here and in workers
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ingest_api", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--metrics-dir", type=Path, help=f"where workers keep their metrics (default ${METRICS_DIR}, else a temporary one)")
    args = parser.parse_args(argv)
    fresh_metrics_dir(args.metrics_dir)
    uvicorn.run("ingest_api.app:app", host=args.host, port=args.port, workers=args.workers, access_log=False)


if __name__ == "__main__":
    main()
