"""``make bench-read``: what scientists wait for in Datasette, and how fast the publisher catches up.

It starts its own services in a temporary directory (the helpers of ``make bench-ingest``: a
durable Redis, a migrated PostgreSQL primary with its streaming replica), then:

- loads ``rows`` rows into the primary by ``COPY`` (housekeeping samples, and executed
  observations each with a package and ``FILES_PER_OBS`` files), waits for the replica, and runs
  the publisher's full load into a read model in the temporary directory;
- catch-up: ``backlog`` more housekeeping rows by ``COPY``, replayed on the replica, then the
  publisher follows the change capture until it has read everything (rows per second, from the
  first read to the last write). Baseline, in the same run: a raw copy of the same rows from the
  replica into SQLite (one ``SELECT`` formatted as stored, one ``executemany`` ``INSERT`` in one
  transaction) into an empty table of the same layout and indexes in a scratch file; the same
  without the secondary indexes is reported too;
- starts the real ingest API and a real ``datasette serve`` with the repository's metadata and
  ``--plugins-dir datasette/plugins`` (the publisher runs inside it, as under ``make up``), and
  POSTs ``buffered`` housekeeping records in lists; no drainer runs, so they stay buffered;
- p50/p95 through Datasette's JSON API of each table page with its default facets and sort from
  the metadata (``facet_page_p95_ms`` is the slowest table), and of each canned query in the
  metadata (``canned_query_p95_ms`` is the slowest);
- time from the ``202`` of a one-record POST to the row in Datasette's JSON (polled every 5 ms),
  from the ``202`` of a PATCH of that buffered row to its new value there, and from the ``202`` of a
  DELETE of a replicated file to its row gone from there.

``--size full`` (the default) loads 1,000,000 rows; ``--size smoke`` runs every step on 20,000 rows
and a few samples of each page, to check in well under a minute that the benchmark runs and prints
every figure (``FIGURES``); its figures mean little. ``--rows``, ``--backlog`` and ``--buffered``
override the size's.

Prints a summary on stderr, then one JSON line with every figure, last.
"""

import argparse
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import redis
import yaml
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, text

from devstack.local import datasette_command
from devstack.settings import REPO
from opsync.buffer import Buffer
from opsync.ids import new_id
from opsync.lsn import current_position, replica_position
from opsync.read_model.publisher import Publisher
from opsync.read_model.store import ReadModel, layouts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: services, API server, token)

FILES_PER_OBS = 10
OBS_SHARE = 0.10  # share of rows in observations, their packages and files; the rest is housekeeping
SENSORS = 25
LIST_SIZE = 100  # records per POSTed list while buffering
WARMUP = 3
POLL_S = 0.005
TIMEZONE = "America/Santiago"
TARGET_FACET_P95_MS, TARGET_VISIBLE_P95_S, TARGET_CATCHUP_VS_RAW = 500, 1.0, 0.5
SHA = "ab" * 32
DATABASE = "opsync"
HK_COLUMNS = "id, instrument_module_id, sensor, sampled_at, value, unit"


@dataclass(frozen=True)
class Size:
    rows: int  # replicated
    backlog: int  # of the catch-up
    buffered: int  # records POSTed and left buffered
    page_samples: int  # per table page
    query_samples: int  # per canned query
    visible_samples: int  # one-record POSTs timed to Datasette


SIZES = {
    "full": Size(rows=1_000_000, backlog=100_000, buffered=10_000, page_samples=30, query_samples=20, visible_samples=60),
    "smoke": Size(rows=20_000, backlog=2_000, buffered=500, page_samples=5, query_samples=3, visible_samples=5),
}
FIGURES = (
    "replicated_rows",
    "rows_executed_obs_unit",
    "rows_raw_data_package",
    "rows_raw_data_file",
    "rows_housekeeping_sample",
    "buffered_rows",
    "buffered_rows_served",
    "load_primary_s",
    "full_load_s",
    "full_load_records_per_s",
    "facet_page_housekeeping_sample_p50_ms",
    "facet_page_housekeeping_sample_p95_ms",
    "facet_page_raw_data_file_p50_ms",
    "facet_page_raw_data_file_p95_ms",
    "facet_page_executed_obs_unit_p50_ms",
    "facet_page_executed_obs_unit_p95_ms",
    "facet_page_p50_ms",
    "facet_page_p95_ms",
    "canned_queries_measured",
    "canned_query_p95_ms",
    "visible_p50_s",
    "visible_p95_s",
    "visible_max_s",
    "update_visible_p50_s",
    "update_visible_p95_s",
    "update_visible_max_s",
    "delete_gone_p50_s",
    "delete_gone_p95_s",
    "delete_gone_max_s",
    "backlog_rows",
    "catchup_s",
    "catchup_records_per_s",
    "raw_copy_records_per_s",
    "raw_copy_without_indexes_records_per_s",
    "catchup_vs_raw",
    "catchup_vs_raw_without_indexes",
    "run_s",
    "target_facet_page_p95_ms",
    "target_visible_p95_s",
    "target_catchup_vs_raw",
    "facet_target_met",
    "visible_target_met",
    "catchup_target_met",
)  # and canned_<name>_p50_ms, canned_<name>_p95_ms for each canned query of the metadata


# --- loading the primary --------------------------------------------------------------------------


def planning(primary: Engine) -> tuple[list[str], list[str]]:
    """Instrument modules and planned obs_units the data rows reference."""
    modules, obs_units = [str(new_id()) for _ in range(4)], [str(new_id()) for _ in range(20)]
    instrument = str(new_id())
    with primary.begin() as conn:
        conn.execute(text("INSERT INTO instrument (id, name) VALUES (:i, 'CHAI')"), {"i": instrument})
        for n, module in enumerate(modules):
            conn.execute(
                text("INSERT INTO instrument_module (id, instrument_id, name) VALUES (:m, :i, :n)"),
                {"m": module, "i": instrument, "n": f"band-{n}"},
            )
        for n, obs in enumerate(obs_units):
            conn.execute(
                text(
                    "INSERT INTO obs_unit (id, name, program, source_name, ra_deg, dec_deg)"
                    " VALUES (:o, :n, 'P-BENCH', 'Orion KL', 83.8, -5.4)"
                ),
                {"o": obs, "n": f"orion-{n}"},
            )
    return modules, obs_units


def housekeeping(modules: list[str], count: int, start: datetime) -> Iterator[tuple]:
    """One sweep of every sensor of every module per second."""
    per_sweep = SENSORS * len(modules)
    for n in range(count):
        sweep, slot = divmod(n, per_sweep)
        module, sensor = divmod(slot, SENSORS)
        yield (new_id(), modules[module], f"sensor_{sensor:02d}", start + timedelta(seconds=sweep), 4.2 + (n % 97) / 1000, "K")


def copy_rows(conninfo: str, table: str, columns: str, rows) -> None:
    with psycopg.connect(conninfo) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def load_primary(conninfo: str, modules: list[str], obs_units: list[str], rows: int, start: datetime) -> dict[str, int]:
    """``rows`` rows by COPY: observations with a package and their files, then housekeeping."""
    observations = int(rows * OBS_SHARE) // (FILES_PER_OBS + 2)
    obs, packages, files = [], [], []
    for n in range(observations):
        begin = start + timedelta(minutes=10 * n)
        key, package = new_id(), new_id()
        obs.append(
            (
                key,
                obs_units[n % len(obs_units)],
                modules[n % len(modules)],
                "completed",
                begin,
                begin + timedelta(minutes=8),
                json.dumps({"pwv_mm": round(0.4 + n % 50 / 100, 2)}),
            )
        )
        packages.append((package, f"obs-{n:07d}.tar", key, "sealed", FILES_PER_OBS * 734_003_200, SHA))
        files += [
            (new_id(), f"/data/{n:07d}/scan-{f:02d}.fits", 734_003_200, SHA, "fits" if f else "log", key, package)
            for f in range(FILES_PER_OBS)
        ]
    copy_rows(conninfo, "executed_obs_unit", "id, obs_unit_id, instrument_module_id, status, start_time, end_time, metadata", obs)
    copy_rows(conninfo, "raw_data_package", "id, name, executed_obs_unit_id, status, size_bytes, checksum_sha256", packages)
    copy_rows(
        conninfo, "raw_data_file", "id, path, size_bytes, checksum_sha256, file_type, executed_obs_unit_id, raw_data_package_id", files
    )
    samples = rows - len(obs) - len(packages) - len(files)
    copy_rows(conninfo, "housekeeping_sample", HK_COLUMNS, housekeeping(modules, samples, start))
    return {"executed_obs_unit": len(obs), "raw_data_package": len(packages), "raw_data_file": len(files), "housekeeping_sample": samples}


def wait_replica(primary: Engine, replica: Engine, timeout_s: float = 300) -> None:
    target, deadline = current_position(primary), time.monotonic() + timeout_s
    while replica_position(replica) < target:
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not catch up")
        time.sleep(0.05)


# --- catch-up against a raw copy ------------------------------------------------------------------


def catch_up(publisher: Publisher) -> float:
    """Seconds for the publisher to follow every change the replica holds."""
    started = time.perf_counter()
    while publisher.follow_replica():
        pass
    return time.perf_counter() - started


def raw_copy(replica: Engine, scratch: Path, after: str, indexes: bool) -> tuple[int, float]:
    """The backlog's rows (keys past ``after``) straight from the replica into an empty table: (rows, seconds)."""
    layout = layouts(TIMEZONE)["housekeeping_sample"]
    scratch.unlink(missing_ok=True)
    db = sqlite3.connect(scratch)
    db.execute(layout.create_sql())
    for sql in layout.indexes.values() if indexes else ():
        db.execute(sql)
    names = [c.name for c in layout.data_columns]
    insert = f"INSERT INTO housekeeping_sample ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    query = layout.load_query().where(layout.entry.table.c.id > uuid.UUID(after))
    started = time.perf_counter()
    with replica.connect() as conn:
        rows = conn.execute(query).all()
    db.executemany(insert, rows)
    db.commit()
    elapsed = time.perf_counter() - started
    db.close()
    return len(rows), elapsed


# --- Datasette ------------------------------------------------------------------------------------


@contextmanager
def datasette(model: Path, env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``datasette serve`` as ``make up`` runs it (same metadata, plugins and settings), the publisher inside."""
    port = ingest_bench.free_port()
    command = datasette_command(model, "127.0.0.1", port)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ingest_bench.wait_ready(proc, 60, f"{base}/-/versions.json", f"datasette (log: {log_path})")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def timed(client: httpx.Client, url: str, params: dict, samples: int, check: Callable[[dict], None]) -> list[float]:
    """Milliseconds per request after ``WARMUP`` untimed ones; every answer checked."""
    times = []
    for n in range(WARMUP + samples):
        started = time.perf_counter()
        response = client.get(url, params=params)
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        check(response.json())
        if n >= WARMUP:
            times.append(elapsed)
    return times


def facets_present(expected: list[str]) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        missing = set(expected) - set(body.get("facet_results", {}))
        if missing or body.get("facets_timed_out"):
            raise RuntimeError(f"facets missing {sorted(missing)} or timed out {body.get('facets_timed_out')}")

    return check


def q(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def canned_params(sql: str, sensor: str, start: datetime) -> dict[str, str]:
    """Values for a canned query's parameters: the current night, one sensor over one hour."""
    known = {
        "night": "",
        "sensor": sensor,
        "start": start.isoformat(timespec="seconds").replace("+00:00", ""),
        "end": (start + timedelta(hours=1)).isoformat(timespec="seconds").replace("+00:00", ""),
    }
    return {name: known.get(name, "") for name in dict.fromkeys(re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", sql))}


def post_buffered(api: str, token: str, modules: list[str], count: int, start: datetime) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    samples = housekeeping(modules, count, start)
    with httpx.Client(base_url=api, headers=headers, timeout=30) as client:
        for _ in range(0, count, LIST_SIZE):
            body = [
                {"instrument_module_id": m, "sensor": s, "sampled_at": at.isoformat(), "value": v, "unit": u}
                for _, m, s, at, v, u in (next(samples) for _ in range(LIST_SIZE))
            ]
            response = client.post("/v1/records/housekeeping_sample", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST refused: {response.status_code} {response.text}")


def shown_after(reader: httpx.Client, table: str, key: str, shown: Callable[[list], bool], accepted: float) -> float:
    """Seconds from ``accepted`` until Datasette's JSON rows of ``key`` pass ``shown`` (polled every ``POLL_S``)."""
    while not shown(reader.get(f"/{DATABASE}/{table}.json", params={"id": key, "_shape": "array"}).json()):
        if time.perf_counter() - accepted > 30:
            raise RuntimeError(f"{table} row {key} not as expected after 30 s")
        time.sleep(POLL_S)
    return time.perf_counter() - accepted


def visible_latency(
    api: str, base: str, token: str, module: str, samples: int, start: datetime, files: list[str]
) -> tuple[list[float], list[float], list[float]]:
    """Seconds from each 202 to Datasette's JSON showing it, one at a time: a one-record POST (the row
    appears), a PATCH of that buffered row (its new value), a DELETE of one of ``files`` (the row is gone)."""
    inserts, updates, deletes = [], [], []
    with (
        httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10) as poster,
        httpx.Client(base_url=base, timeout=10) as reader,
    ):
        for n, file_key in zip(range(samples), files, strict=True):
            record = {
                "instrument_module_id": module,
                "sensor": "latency_probe",
                "sampled_at": (start + timedelta(seconds=n)).isoformat(),
                "value": float(n),
                "unit": "K",
            }
            response = poster.post("/v1/records/housekeeping_sample", json=record)
            accepted = time.perf_counter()
            key = response.json()["ids"][0]
            inserts.append(shown_after(reader, "housekeeping_sample", key, bool, accepted))
            value = -1.0 - n
            response = poster.patch(f"/v1/records/housekeeping_sample/{key}", json={"value": value})
            accepted = time.perf_counter()
            if response.status_code != 202:
                raise RuntimeError(f"PATCH refused: {response.status_code} {response.text}")
            updates.append(shown_after(reader, "housekeeping_sample", key, lambda rows, v=value: rows[0]["value"] == v, accepted))
            shown_after(reader, "raw_data_file", file_key, bool, time.perf_counter())  # served before: its going is seen
            response = poster.delete(f"/v1/records/raw_data_file/{file_key}")
            accepted = time.perf_counter()
            if response.status_code != 202:
                raise RuntimeError(f"DELETE refused: {response.status_code} {response.text}")
            deletes.append(shown_after(reader, "raw_data_file", file_key, lambda rows: not rows, accepted))
            time.sleep(0.1)
    return inserts, updates, deletes


# --- the run --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full", help="smoke: every step, on little data (default full)")
    parser.add_argument("--rows", type=int, help=f"replicated rows (full: {SIZES['full'].rows:,})")
    parser.add_argument("--backlog", type=int, help=f"catch-up backlog (full: {SIZES['full'].backlog:,})")
    parser.add_argument("--buffered", type=int, help=f"buffered rows (full: {SIZES['full'].buffered:,})")
    parser.set_defaults(**asdict(SIZES[parser.parse_known_args()[0].size]))
    args = parser.parse_args()
    console = Console(stderr=True)
    run_started = time.monotonic()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opsync-bench-read-")))
        console.print("[bold]starting[/] Redis and PostgreSQL primary + replica …")
        site = stack.enter_context(ingest_bench.services())
        primary, replica = create_engine(site.primary.url()), create_engine(site.replica.url())
        stack.callback(primary.dispose)
        stack.callback(replica.dispose)
        modules, obs_units = planning(primary)
        start = datetime(2026, 11, 1, tzinfo=UTC)

        console.print(f"loading {args.rows:,} rows into the primary by COPY …")
        started = time.perf_counter()
        loaded = load_primary(site.primary.conninfo(), modules, obs_units, args.rows, start)
        wait_replica(primary, replica)
        load_s = time.perf_counter() - started

        model_path = workdir / "opsync.db"
        client = redis.Redis.from_url(site.redis.url, socket_timeout=30)
        publisher = Publisher(ReadModel(model_path, TIMEZONE), Buffer(client), replica)
        console.print("publisher: full load from the replica …")
        started = time.perf_counter()
        publisher.follow_replica()
        full_load_s = time.perf_counter() - started

        with replica.connect() as conn:
            last_key = str(conn.execute(text("SELECT id FROM housekeeping_sample ORDER BY id DESC LIMIT 1")).scalar_one())
        console.print(f"catch-up: {args.backlog:,} more rows by COPY, replayed, then followed by the publisher …")
        later = start + timedelta(days=60)
        copy_rows(site.primary.conninfo(), "housekeeping_sample", HK_COLUMNS, housekeeping(modules, args.backlog, later))
        wait_replica(primary, replica)
        catchup_s = catch_up(publisher)
        publisher.model.close()
        raw_rows, raw_s = raw_copy(replica, workdir / "raw.db", last_key, indexes=True)
        bare_rows, bare_s = raw_copy(replica, workdir / "raw.db", last_key, indexes=False)
        assert raw_rows == bare_rows == args.backlog, (raw_rows, bare_rows)

        api = stack.enter_context(ingest_bench.api_server(site, workdir / "api.log"))
        token = ingest_bench.replicated_token(primary, replica, tables=("housekeeping_sample", "raw_data_file"))
        env = {**site.env, "OPSYNC_READ_MODEL_PATH": str(model_path), "OPSYNC_TIMEZONE": TIMEZONE}
        console.print("datasette serve (metadata, plugins, the publisher inside) …")
        base = stack.enter_context(datasette(model_path, env, workdir / "datasette.log"))
        console.print(f"buffering {args.buffered:,} records through the ingest API …")
        post_buffered(api.url, token, modules, args.buffered, later + timedelta(days=30))

        metadata = yaml.safe_load((REPO / "opsync_observatory/datasette.yml").read_text())["databases"][DATABASE]
        http = stack.enter_context(httpx.Client(base_url=base, timeout=30))
        pages: dict[str, list[float]] = {}
        for table in ("housekeeping_sample", "raw_data_file", "executed_obs_unit"):
            facets = metadata.get("tables", {}).get(table, {}).get("facets", [])
            console.print(f"table page {table} (facets {', '.join(facets)}) × {args.page_samples} …")
            pages[table] = timed(http, f"/{DATABASE}/{table}.json", {}, args.page_samples, facets_present(facets))
        queries: dict[str, list[float]] = {}
        for name, query in metadata.get("queries", {}).items():
            params = canned_params(query["sql"], "sensor_00", later)
            console.print(f"canned query {name} × {args.query_samples} …")
            queries[name] = timed(http, f"/{DATABASE}/{name}.json", params, args.query_samples, lambda body: None)
        console.print(f"POST, PATCH, DELETE → shown in Datasette, {args.visible_samples} of each one at a time …")
        with replica.connect() as conn:
            oldest = conn.execute(text("SELECT id FROM raw_data_file ORDER BY id LIMIT :n"), {"n": args.visible_samples})
            files = [str(key) for key in oldest.scalars()]
        visible, updated, deleted = visible_latency(
            api.url, base, token, modules[0], args.visible_samples, later + timedelta(days=45), files
        )
        served = http.get(f"/{DATABASE}/housekeeping_sample.json", params={"_sync_state__exact": "buffered", "_size": 0}).json()

    catchup_rate, raw_rate, bare_rate = args.backlog / catchup_s, raw_rows / raw_s, bare_rows / bare_s
    figures: dict[str, float | int | bool | str | None] = {
        "replicated_rows": args.rows,
        **{f"rows_{table}": n for table, n in loaded.items()},
        "buffered_rows": args.buffered,
        "buffered_rows_served": served.get("filtered_table_rows_count"),
        "load_primary_s": round(load_s, 1),
        "full_load_s": round(full_load_s, 1),
        "full_load_records_per_s": round(args.rows / full_load_s),
        **{f"facet_page_{table}_p{p}_ms": round(q(times, p), 1) for table, times in pages.items() for p in (50, 95)},
        "facet_page_p50_ms": round(max(q(times, 50) for times in pages.values()), 1),
        "facet_page_p95_ms": round(max(q(times, 95) for times in pages.values()), 1),
        **{f"canned_{name}_p{p}_ms": round(q(times, p), 1) for name, times in queries.items() for p in (50, 95)},
        "canned_queries_measured": len(queries),
        "canned_query_p95_ms": round(max((q(times, 95) for times in queries.values()), default=0), 1) or None,
        "visible_p50_s": round(statistics.median(visible), 3),
        "visible_p95_s": round(q(visible, 95), 3),
        "visible_max_s": round(max(visible), 3),
        **{
            f"{name}_{stat}_s": round(f(times), 3)
            for name, times in (("update_visible", updated), ("delete_gone", deleted))
            for stat, f in (("p50", statistics.median), ("p95", lambda t: q(t, 95)), ("max", max))
        },
        "backlog_rows": args.backlog,
        "catchup_s": round(catchup_s, 2),
        "catchup_records_per_s": round(catchup_rate),
        "raw_copy_records_per_s": round(raw_rate),
        "raw_copy_without_indexes_records_per_s": round(bare_rate),
        "catchup_vs_raw": round(catchup_rate / raw_rate, 3),
        "catchup_vs_raw_without_indexes": round(catchup_rate / bare_rate, 3),
        "run_s": round(time.monotonic() - run_started, 1),
        "target_facet_page_p95_ms": TARGET_FACET_P95_MS,
        "target_visible_p95_s": TARGET_VISIBLE_P95_S,
        "target_catchup_vs_raw": TARGET_CATCHUP_VS_RAW,
    }
    met = {
        "facet_target_met": figures["facet_page_p95_ms"] < TARGET_FACET_P95_MS,
        "visible_target_met": figures["visible_p95_s"] < TARGET_VISIBLE_P95_S,
        "catchup_target_met": figures["catchup_vs_raw"] >= TARGET_CATCHUP_VS_RAW,
    }
    figures |= met

    yes = {True: "[green]yes[/]", False: "[red]no[/]"}
    table = Table("figure", "p50", "p95", "target", "met")
    for name, times in pages.items():
        table.add_row(f"table page {name}", f"{q(times, 50):.0f} ms", f"{q(times, 95):.0f} ms", f"< {TARGET_FACET_P95_MS} ms", "")
    for name, times in queries.items():
        table.add_row(f"canned query {name}", f"{q(times, 50):.0f} ms", f"{q(times, 95):.0f} ms", "", "")
    table.add_row(
        "slowest faceted page", "", f"{figures['facet_page_p95_ms']} ms", f"< {TARGET_FACET_P95_MS} ms", yes[met["facet_target_met"]]
    )
    table.add_row(
        "202 → visible in Datasette",
        f"{figures['visible_p50_s']} s",
        f"{figures['visible_p95_s']} s",
        f"< {TARGET_VISIBLE_P95_S:g} s",
        yes[met["visible_target_met"]],
    )
    for label, name in (("PATCH 202 → new value in Datasette", "update_visible"), ("DELETE 202 → gone from Datasette", "delete_gone")):
        table.add_row(label, f"{figures[f'{name}_p50_s']} s", f"{figures[f'{name}_p95_s']} s", "", "")
    table.add_row("catch-up records/s", f"{catchup_rate:,.0f}", "", "", "")
    table.add_row("raw copy records/s (same indexes)", f"{raw_rate:,.0f}", "", "", "")
    table.add_row("  without secondary indexes", f"{bare_rate:,.0f}", "", "", "")
    table.add_row(
        "catch-up / raw copy", f"{figures['catchup_vs_raw']:.0%}", "", f"≥ {TARGET_CATCHUP_VS_RAW:.0%}", yes[met["catchup_target_met"]]
    )
    console.print(table)
    console.print(
        f"{args.rows:,} rows loaded in {load_s:.1f} s, full load {full_load_s:.1f} s; "
        f"{len(queries)} canned queries in the metadata measured; whole run {figures['run_s']} s"
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
