"""``make bench-datasette-load``: does an ordinary table page still answer while hostile SQL runs?

It fills a read model of realistic size straight through :class:`opsync.read_model.store.ReadModel` (the
layout, indexes and stored forms the publisher writes; ``full``: 1M rows shaped as ``make bench-read``
loads them, ``smoke``: 20k), and starts a real ``datasette serve`` with the command ``make up`` uses
(:func:`devstack.local.datasette_command`: metadata, settings, plugins), minus the publisher plugin
(no Redis or PostgreSQL here; the file is written before Datasette starts). Then, in the same run:

- baseline: the ``executed_obs_unit`` table page (JSON, its default facets and sort) requested one at
  a time, p50/p95;
- hostile: ``HOSTILE_CLIENTS`` clients each send expensive SQL in a loop (recursive CTEs, cross joins,
  huge group-bys, huge blobs and strings, LIKE over everything, random sorts, results of hundreds of MB,
  a refused function) and table pages asked for facets, LIKE filters and sorts over every row, while the
  same page is requested again, p50/p95 (target: p95 under 1 s); every
  hostile answer is counted by status (``200``, ``400`` time limit or refusal, ``503`` no SQL slot);
- Datasette's resident memory: after the baseline, and its peak during the hostile phase (polled, and
  the kernel's high-water mark).

Prints progress on stderr, then one JSON line with every figure, last.
"""

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil

from devstack.local import datasette_command
from devstack.settings import REPO
from opsync.ids import new_id
from opsync.read_model.store import ReadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: free_port)

SIZES = {"full": {"rows": 1_000_000, "seconds": 30, "baseline": 40}, "smoke": {"rows": 20_000, "seconds": 6, "baseline": 10}}
FILES_PER_OBS, OBS_SHARE, SENSORS, MODULES = 10, 0.10, 25, 4  # as bench/read.py loads the primary
TIMEZONE = "America/Santiago"
DATABASE = "opsync"
PAGE = f"/{DATABASE}/executed_obs_unit.json"
HOSTILE_CLIENTS = 10
PAGE_INTERVAL_S = 0.1
TARGET_P95_MS = 1000
HOSTILE_SQL = (
    "with recursive c(x) as (select 1 union all select x + 1 from c) select count(*) from c",
    "select count(*) from housekeeping_sample a, housekeeping_sample b",
    "select sampled_at, value, count(*) from housekeeping_sample group by sampled_at, value order by 3 desc limit 5",
    "select length(randomblob(300000000))",
    "with recursive s(x, n) as (select 'x', 0 union all select x || x, n + 1 from s where n < 40) select max(length(x)) from s",
    "select count(*) from housekeeping_sample where sensor || id || sampled_at || unit like '%zz%'",
    "select * from housekeeping_sample order by random() limit 1",
    "select length(json_group_array(json_object('id', id, 'at', sampled_at, 'v', value))) from housekeeping_sample",
    "with recursive c(x) as (select 1 union all select x + 1 from c limit 1000) select printf('%.*c', 1000000, 'x') from c",
    "select hex(fts3_tokenizer('simple'))",
)
HOSTILE_PAGES = (  # table pages asked for facets, filters and sorts that scan everything
    ("/opsync/housekeeping_sample.json", {"_facet": ["id", "sampled_at", "value", "_updated_at", "unit"]}),
    ("/opsync/housekeeping_sample.json", {"id__contains": "zz", "_sort": "value"}),
    ("/opsync/raw_data_file.json", {"path__contains": "zz", "_facet": ["path", "checksum_sha256"]}),
)
HOSTILE = tuple((f"/{DATABASE}.json", {"sql": sql, "_shape": "array"}) for sql in HOSTILE_SQL) + HOSTILE_PAGES
FIGURES = (
    "size",
    "rows",
    "build_s",
    "hostile_clients",
    "hostile_seconds",
    "page_baseline_p50_ms",
    "page_baseline_p95_ms",
    "page_under_load_p50_ms",
    "page_under_load_p95_ms",
    "page_under_load_max_ms",
    "page_requests_under_load",
    "page_errors_under_load",
    "hostile_requests",
    "hostile_ok",
    "hostile_refused_400",
    "hostile_busy_503",
    "hostile_other",
    "rss_baseline_mb",
    "rss_peak_hostile_mb",
    "rss_high_water_mb",
    "target_page_p95_ms",
    "page_target_met",
)


def fill(path: Path, rows: int) -> None:
    """``rows`` replicated rows: planning data, observations each with a package and files, housekeeping."""
    model = ReadModel(path, TIMEZONE)
    tables, at = model.layouts, datetime.now(UTC).isoformat(timespec="microseconds")

    def records(table: str, rows_) -> list[tuple]:
        return [tables[table].record(row, "replicated", None, None, at) for row in rows_]

    start = datetime(2026, 11, 1, tzinfo=UTC)
    instrument, modules, plans = str(new_id()), [str(new_id()) for _ in range(MODULES)], [str(new_id()) for _ in range(20)]
    observations = int(rows * OBS_SHARE) // (FILES_PER_OBS + 2)
    try:
        with model.bulk_load(), model.transaction() as conn:
            model.insert(conn, tables["instrument"], records("instrument", [{"id": instrument, "name": "CHAI", "active": True}]))
            model.insert(
                conn,
                tables["instrument_module"],
                records(
                    "instrument_module",
                    [{"id": m, "instrument_id": instrument, "name": f"band-{n}", "active": True} for n, m in enumerate(modules)],
                ),
            )
            model.insert(
                conn,
                tables["obs_unit"],
                records(
                    "obs_unit",
                    [
                        {
                            "id": p,
                            "name": f"orion-{n}",
                            "program": "P-BENCH",
                            "source_name": "Orion KL",
                            "ra_deg": 83.8,
                            "dec_deg": -5.4,
                            "priority": 3,
                        }
                        for n, p in enumerate(plans)
                    ],
                ),
            )
            obs, packages, files = [], [], []
            for n in range(observations):
                begin, key, package = start + timedelta(minutes=10 * n), str(new_id()), str(new_id())
                obs.append(
                    {
                        "id": key,
                        "obs_unit_id": plans[n % len(plans)],
                        "instrument_module_id": modules[n % MODULES],
                        "status": "completed",
                        "start_time": begin,
                        "end_time": begin + timedelta(minutes=8),
                        "metadata": {"pwv_mm": round(0.4 + n % 50 / 100, 2)},
                    }
                )
                packages.append(
                    {
                        "id": package,
                        "name": f"obs-{n:07d}.tar",
                        "executed_obs_unit_id": key,
                        "status": "sealed",
                        "size_bytes": FILES_PER_OBS * 734_003_200,
                        "checksum_sha256": "ab" * 32,
                    }
                )
                files += [
                    {
                        "id": str(new_id()),
                        "path": f"/data/{n:07d}/scan-{f:02d}.fits",
                        "size_bytes": 734_003_200,
                        "checksum_sha256": "ab" * 32,
                        "file_type": "fits" if f else "log",
                        "executed_obs_unit_id": key,
                        "raw_data_package_id": package,
                    }
                    for f in range(FILES_PER_OBS)
                ]
            for table, found in (("executed_obs_unit", obs), ("raw_data_package", packages), ("raw_data_file", files)):
                model.insert(conn, tables[table], records(table, found))
            samples = rows - len(obs) - len(packages) - len(files)
            per_sweep = SENSORS * MODULES
            for first in range(0, samples, 50_000):
                batch = []
                for n in range(first, min(first + 50_000, samples)):
                    sweep, slot = divmod(n, per_sweep)
                    module, sensor = divmod(slot, SENSORS)
                    batch.append(
                        {
                            "id": str(new_id()),
                            "instrument_module_id": modules[module],
                            "sensor": f"sensor_{sensor:02d}",
                            "sampled_at": start + timedelta(seconds=sweep),
                            "value": 4.2 + (n % 97) / 1000,
                            "unit": "K",
                        }
                    )
                model.insert(conn, tables["housekeeping_sample"], records("housekeeping_sample", batch))
    finally:
        model.close()


@contextmanager
def datasette(model: Path, workdir: Path) -> Iterator[tuple[str, psutil.Process]]:
    """``datasette serve`` as ``make up`` runs it, with every plugin but the publisher."""
    plugins = workdir / "plugins"
    plugins.mkdir()
    for plugin in (REPO / "datasette/plugins").glob("*.py"):
        if plugin.name != "opsync_publisher.py":
            shutil.copy(plugin, plugins)
    port = ingest_bench.free_port()
    command = datasette_command(model, "127.0.0.1", port)
    command[command.index("--plugins-dir") + 1] = str(plugins)
    log_path = workdir / "datasette.log"
    with open(log_path, "ab") as log:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPSYNC_DATASETTE_PUBLISHER": "false"}
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ingest_bench.wait_ready(proc, 60, f"{base}/-/versions.json", f"datasette (log: {log_path})")
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def page_times(client: httpx.Client, until: float | None, count: int | None) -> tuple[list[float], int]:
    """Milliseconds per page request (``count`` of them, or until ``until``), and how many failed."""
    times, errors = [], 0
    while (count is None or len(times) + errors < count) and (until is None or time.monotonic() < until):
        started = time.perf_counter()
        try:
            response = client.get(PAGE)
            failure = None if response.status_code == 200 else f"{response.status_code} {response.text[:300]}"
        except httpx.TransportError as exc:
            failure = repr(exc)
        if failure is None:
            times.append((time.perf_counter() - started) * 1000)
        else:
            errors += 1
            print(f"page request failed: {failure}", file=sys.stderr, flush=True)
        time.sleep(PAGE_INTERVAL_S)
    return times, errors


def hostile(base: str, client_no: int, until: float, answers: collections.Counter, lock: threading.Lock) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        n = client_no
        while time.monotonic() < until:
            path, params = HOSTILE[n % len(HOSTILE)]
            n += 1
            try:
                status = client.get(path, params=params).status_code
            except httpx.TransportError:
                status = "transport"
            with lock:
                answers[status] += 1


def peak_rss(proc: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.05):
        peak[0] = max(peak[0], proc.memory_info().rss)


def high_water_mb(proc: psutil.Process) -> float:
    with open(f"/proc/{proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def q(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    args = parser.parse_args()
    size = SIZES[args.size]
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opsync-bench-datasette-")))
        model = workdir / f"{DATABASE}.db"
        log(f"filling a read model with {size['rows']:,} rows …")
        started = time.perf_counter()
        fill(model, size["rows"])
        build_s = time.perf_counter() - started
        log("datasette serve (metadata, settings, plugins but the publisher) …")
        base, proc = stack.enter_context(datasette(model, workdir))
        client = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        page_times(client, None, 3)  # warm-up
        log(f"baseline: {PAGE} × {size['baseline']} …")
        baseline, baseline_errors = page_times(client, None, size["baseline"])
        if baseline_errors:
            raise RuntimeError(f"{baseline_errors} baseline page requests failed")
        rss_baseline = proc.memory_info().rss

        log(f"hostile: {HOSTILE_CLIENTS} clients of expensive SQL and pages for {size['seconds']} s, the page meanwhile …")
        answers, lock, stop, peak = collections.Counter(), threading.Lock(), threading.Event(), [rss_baseline]
        until = time.monotonic() + size["seconds"]
        threads = [threading.Thread(target=hostile, args=(base, n, until, answers, lock)) for n in range(HOSTILE_CLIENTS)]
        threads.append(threading.Thread(target=peak_rss, args=(proc, stop, peak)))
        for thread in threads:
            thread.start()
        time.sleep(1)  # every hostile client has its first query in
        loaded, loaded_errors = page_times(client, until, None)
        for thread in threads[:-1]:
            thread.join()
        stop.set()
        threads[-1].join()
        high_water = high_water_mb(proc)

    figures = {
        "size": args.size,
        "rows": size["rows"],
        "build_s": round(build_s, 1),
        "hostile_clients": HOSTILE_CLIENTS,
        "hostile_seconds": size["seconds"],
        "page_baseline_p50_ms": round(q(baseline, 50), 1),
        "page_baseline_p95_ms": round(q(baseline, 95), 1),
        "page_under_load_p50_ms": round(q(loaded, 50), 1) if loaded else None,
        "page_under_load_p95_ms": round(q(loaded, 95), 1) if loaded else None,
        "page_under_load_max_ms": round(max(loaded), 1) if loaded else None,
        "page_requests_under_load": len(loaded),
        "page_errors_under_load": loaded_errors,
        "hostile_requests": sum(answers.values()),
        "hostile_ok": answers[200],
        "hostile_refused_400": answers[400],
        "hostile_busy_503": answers[503],
        "hostile_other": sum(n for status, n in answers.items() if status not in (200, 400, 503)),
        "rss_baseline_mb": round(rss_baseline / 2**20, 1),
        "rss_peak_hostile_mb": round(peak[0] / 2**20, 1),
        "rss_high_water_mb": round(high_water, 1),
        "target_page_p95_ms": TARGET_P95_MS,
    }
    figures["page_target_met"] = bool(loaded) and not loaded_errors and figures["page_under_load_p95_ms"] < TARGET_P95_MS
    log(
        f"page {PAGE}: baseline p50 {figures['page_baseline_p50_ms']} ms, p95 {figures['page_baseline_p95_ms']} ms; "
        f"under load p50 {figures['page_under_load_p50_ms']} ms, p95 {figures['page_under_load_p95_ms']} ms "
        f"(target < {TARGET_P95_MS} ms: {'met' if figures['page_target_met'] else 'NOT met'}); "
        f"hostile answers {dict(answers)}; RSS {figures['rss_baseline_mb']} → peak {figures['rss_peak_hostile_mb']} MB"
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
