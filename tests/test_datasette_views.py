"""What scientists see: a real ``datasette serve`` with the domain's ``opsync_observatory/datasette.yml`` (merged with the
engine's, as every start merges them) and the row-link plugins, on a read model filled through
:mod:`opsync.read_model.store` (as the publisher fills it).

The publisher plugin is left out (the plugins directory served here holds the others):
the file is written by the test, and no publisher should reach for Redis or PostgreSQL.
"""

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pendulum
import pytest

from devstack.local import DATASETTE_SETTINGS
from opsync.ids import new_id
from opsync.read_model import metadata as served_metadata
from opsync.read_model.store import ReadModel, layouts
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
METADATA = REPO / "opsync_observatory/datasette.yml"
SITE_TZ = "America/Santiago"
DB = "opsync"
# The settings `make up` gives Datasette (devstack/local.py), without the plugins directory.
SETTINGS = list(DATASETTE_SETTINGS)


@dataclass
class Site:
    """The rows written, by role, and the night they belong to."""

    night: str  # the latest observing night (local date it began on)
    earlier_night: str
    evening: str  # executed_obs_unit ids
    after_midnight: str
    night_before: str
    files: dict[str, str]  # role -> raw_data_file id
    package: str
    module: str
    samples: list[str]  # sampled_at of mixer_temperature, oldest first
    sample_minutes: list[str]  # the same times as "YYYY-MM-DD HH:MM" (as a person types them)
    depth_peak_at: str  # sync_metrics.at of the sample with buffer_depth 40


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def fill_read_model(path: Path) -> Site:
    """A small observatory: two nights of observations, files in every sync state, housekeeping, metrics."""
    model = ReadModel(path, SITE_TZ)
    tables = model.layouts
    now = datetime.now(UTC)
    stamp = utc_iso(now)

    def put(table: str, state: str = "replicated", **row) -> str:
        row.setdefault("id", str(new_id()))
        layout = tables[table]
        txn = None if state == "replicated" else str(new_id())
        lsn = "0/16B3748" if state in ("committed", "replicated") and txn else None
        model.apply(layout, [row["id"]], {row["id"]: layout.record(row, state, txn, lsn, stamp)})
        return row["id"]

    try:
        instrument = put("instrument", name="CHAI", active=True, created_at=stamp, updated_at=stamp)
        module = put("instrument_module", instrument_id=instrument, name="LFA", active=True, created_at=stamp, updated_at=stamp)
        plan = put(
            "obs_unit",
            name="orion-1",
            program="P1",
            source_name="Orion KL",
            ra_deg=83.8,
            dec_deg=-5.4,
            priority=3,
            parameters={"scan": "otf"},
            created_at=stamp,
            updated_at=stamp,
        )

        local = pendulum.now(SITE_TZ)
        night = local.subtract(days=2).date()
        evening_start = pendulum.datetime(night.year, night.month, night.day, 22, tz=SITE_TZ)
        after_midnight_start = evening_start.add(hours=4)  # 02:00 local, the next calendar day
        night_before_start = evening_start.subtract(days=1).add(hours=1)

        def observation(start, status, state="replicated") -> str:
            return put(
                "executed_obs_unit",
                state,
                obs_unit_id=plan,
                instrument_module_id=module,
                status=status,
                start_time=utc_iso(start),
                end_time=utc_iso(start.add(minutes=30)),
                metadata={"pwv_mm": 0.4},
            )

        evening = observation(evening_start, "completed")
        after_midnight = observation(after_midnight_start, "running", state="buffered")
        night_before = observation(night_before_start, "failed")

        package = put(
            "raw_data_package",
            name="pkg-evening.tar",
            executed_obs_unit_id=evening,
            status="sealed",
            size_bytes=3500,
            checksum_sha256="a" * 64,
        )
        files = {
            "evening_replicated": put(
                "raw_data_file",
                path="/data/evening/1.fits",
                size_bytes=1000,
                checksum_sha256="b" * 64,
                file_type="fits",
                executed_obs_unit_id=evening,
                raw_data_package_id=package,
            ),
            "evening_buffered": put(
                "raw_data_file",
                "buffered",
                path="/data/evening/2.fits",
                size_bytes=2500,
                checksum_sha256="c" * 64,
                file_type="fits",
                executed_obs_unit_id=evening,
            ),
            "after_midnight_committed": put(
                "raw_data_file",
                "committed",
                path="/data/late/1.hdf5",
                size_bytes=700,
                checksum_sha256="d" * 64,
                file_type="hdf5",
                executed_obs_unit_id=after_midnight,
            ),
            "night_before_replicated": put(
                "raw_data_file",
                path="/data/before/1.log",
                size_bytes=10,
                checksum_sha256="e" * 64,
                file_type="log",
                executed_obs_unit_id=night_before,
            ),
            "night_before_failed": put(
                "raw_data_file",
                "failed",
                path="/data/before/2.log",
                size_bytes=20,
                checksum_sha256="f" * 64,
                file_type="log",
                executed_obs_unit_id=night_before,
            ),
        }

        first = now.replace(second=0, microsecond=0) - timedelta(minutes=50)
        samples = [first + timedelta(minutes=10 * i) for i in range(5)]
        for i, moment in enumerate(samples):
            put(
                "housekeeping_sample",
                "buffered" if i == 4 else "replicated",
                instrument_module_id=module,
                sensor="mixer_temperature",
                sampled_at=utc_iso(moment),
                value=4.2 + i / 10,
                unit="K",
            )
            put("housekeeping_sample", instrument_module_id=module, sensor="lna_bias", sampled_at=utc_iso(moment), value=1.5, unit="V")

        depth_peak_at = utc_iso(now - timedelta(minutes=10))
        for minutes_ago, depth in ((30, 0), (20, 12), (10, 40), (0, 3)):
            at = depth_peak_at if depth == 40 else utc_iso(now - timedelta(minutes=minutes_ago))
            figures = {
                "buffer_depth": depth,
                "oldest_buffered_age_s": depth * 1.5,
                "awaiting_replica": depth // 2,
                "dead_letters": 1,
                "replica_lag_s": 0.2 + depth / 100,
            }
            model.append_metrics(at, figures, keep_days=3)
    finally:
        model.close()
    return Site(
        night=night.isoformat(),
        earlier_night=night.subtract(days=1).isoformat(),
        evening=evening,
        after_midnight=after_midnight,
        night_before=night_before,
        files=files,
        package=package,
        module=module,
        samples=[utc_iso(s) for s in samples],
        sample_minutes=[s.strftime("%Y-%m-%d %H:%M") for s in samples],
        depth_peak_at=depth_peak_at,
    )


def served(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serve_datasette(
    workdir: Path, model_path: Path, env: dict[str, str] | None = None, metadata: Path = METADATA, merge: bool = True
) -> Iterator[str]:
    """``datasette serve`` as `make up` runs it, with every plugin but the publisher; yields its base URL.

    ``metadata``: a domain's, merged with the engine's as every start does (``merge=False``: served as it is).
    Anonymous visitors read, as under `make up` (``OPSYNC_DATASETTE_PUBLIC=true``) unless ``env`` says otherwise."""
    plugins = workdir / "plugins"
    plugins.mkdir(exist_ok=True)
    for plugin in (REPO / "datasette/plugins").glob("*.py"):
        if plugin.name != "opsync_publisher.py":
            shutil.copy(plugin, plugins)
    port = free_port()
    with open(workdir / "datasette.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "datasette"),
                "serve",
                str(model_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metadata",
                str(served_metadata.write(workdir / "metadata.json", metadata) if merge else metadata),
                "--plugins-dir",
                str(plugins),
                *SETTINGS,
            ],
            env={
                **os.environ,
                "PYTHONPATH": str(REPO),
                "OPSYNC_DATASETTE_PUBLIC": "true",
                "OPSYNC_DATASETTE_PUBLISHER": "false",
                **(env or {}),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while not served(f"{base}/-/versions.json"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"datasette did not start:\n{(workdir / 'datasette.log').read_text()}")
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            process.wait(30)


@contextmanager
def datasette_site(workdir: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, "Site", Path]]:
    """A read model filled with a known night, served; yields (base URL, its rows, the file)."""
    model_path = workdir / "opsync.db"
    rows = fill_read_model(model_path)
    with serve_datasette(workdir, model_path, env) as base:
        yield base, rows, model_path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with datasette_site(tmp_path_factory.mktemp("datasette")) as served_site:
        yield served_site


@pytest.fixture(scope="module")
def base(site) -> str:
    return site[0]


@pytest.fixture(scope="module")
def rows(site) -> Site:
    return site[1]


def get_json(url: str, **params) -> dict | list:
    response = httpx.get(url, params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def canned(base: str, name: str, **params) -> list[dict]:
    return get_json(f"{base}/{DB}/{name}.json", _shape="array", **params)


def metadata() -> dict:
    return served_metadata.merged(METADATA)


# --- metadata -------------------------------------------------------------------------------------


def test_every_published_column_is_described_and_internal_tables_are_not_published(tmp_path):
    model_path = tmp_path / "opsync.db"
    ReadModel(model_path, SITE_TZ).close()
    with sqlite3.connect(model_path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {t: [c[1] for c in conn.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    assert not tables & {"sync_ledger", "api_token", "row_change", "row_change_horizon"}
    assert set(layouts(SITE_TZ)) < tables
    described = metadata()["databases"][DB]["tables"]
    for table in tables - {"publisher_state"}:
        entry = described[table]
        assert entry.get("title") and entry.get("description"), table
        missing = [c for c in columns[table] if not entry.get("columns", {}).get(c)]
        assert not missing, f"{table}: undescribed columns {missing}"
    assert described["publisher_state"]["hidden"] is True


def test_no_canned_query_writes():
    queries = metadata()["databases"][DB]["queries"]
    assert queries and not [name for name, query in queries.items() if query.get("write")]


# --- tables ----------------------------------------------------------------------------------------


def test_tables_listed_with_titles_and_hidden_ones_not_listed(base):
    tables = get_json(f"{base}/{DB}.json")["tables"]
    visible = {t["name"] for t in tables if not t["hidden"]}
    assert {"executed_obs_unit", "raw_data_file", "raw_data_package", "housekeeping_sample", "sync_metrics"} <= visible
    assert "publisher_state" not in visible
    assert not {t["name"] for t in tables} & {"sync_ledger", "api_token", "row_change"}
    page = httpx.get(f"{base}/{DB}", timeout=10).text
    assert ">publisher_state<" not in page.split("hidden table")[0]


def test_observation_table_is_newest_first_with_its_facets(base, rows):
    data = get_json(f"{base}/{DB}/executed_obs_unit.json")
    starts = [row[data["columns"].index("start_time")] for row in data["rows"]]
    assert starts == sorted(starts, reverse=True) and len(starts) == 3
    facets = data["facet_results"]
    assert {"night", "status", "instrument_module_id", "_sync_state"} <= set(facets)
    nights = {r["value"]: r["count"] for r in facets["night"]["results"]}
    assert nights == {rows.night: 2, rows.earlier_night: 1}  # the 02:00 observation belongs to the evening's night
    page = httpx.get(f"{base}/{DB}/executed_obs_unit", timeout=10).text
    assert "Executed observations" in page and "Observing night" in page  # title and column description


def test_the_sync_state_facet_filters(base):
    facet = get_json(f"{base}/{DB}/raw_data_file.json")["facet_results"]["_sync_state"]["results"]
    counts = {r["value"]: r["count"] for r in facet}
    assert counts == {"replicated": 2, "buffered": 1, "committed": 1, "failed": 1}
    buffered = next(r for r in facet if r["value"] == "buffered")
    query = dict(parse_qsl(urlsplit(buffered["toggle_url"]).query))
    filtered = get_json(f"{base}/{DB}/raw_data_file.json", _shape="array", **query)
    assert [row["_sync_state"] for row in filtered] == ["buffered"]


def test_facets_of_the_other_tables(base):
    expected = {
        "raw_data_file": {"file_type", "_sync_state"},
        "raw_data_package": {"status", "_sync_state"},
        "housekeeping_sample": {"sensor", "instrument_module_id", "_sync_state"},
    }
    for table, facets in expected.items():
        assert facets <= set(get_json(f"{base}/{DB}/{table}.json")["facet_results"]), table


# --- canned queries --------------------------------------------------------------------------------


def test_tonights_observations_with_file_counts_and_sizes(base, rows):
    tonight = canned(base, "tonights_observations")
    assert [r["id"] for r in tonight] == [rows.after_midnight, rows.evening]  # newest first; 02:00 local is still tonight
    assert {r["night"] for r in tonight} == {rows.night}
    by_id = {r["id"]: r for r in tonight}
    evening, late = by_id[rows.evening], by_id[rows.after_midnight]
    assert (evening["files"], evening["total_size_bytes"], evening["files_not_replicated"]) == (2, 3500, 1)
    assert (late["files"], late["total_size_bytes"], late["files_not_replicated"]) == (1, 700, 1)
    assert (evening["instrument"], evening["module"], evening["source_name"]) == ("CHAI", "LFA", "Orion KL")
    assert late["_sync_state"] == "buffered"
    earlier = canned(base, "tonights_observations", night=rows.earlier_night)
    assert [(r["id"], r["files"], r["total_size_bytes"]) for r in earlier] == [(rows.night_before, 2, 30)]


def test_files_still_not_replicated(base, rows):
    found = canned(base, "files_not_replicated")
    expected = {rows.files[k] for k in ("evening_buffered", "after_midnight_committed", "night_before_failed")}
    assert {r["id"] for r in found} == expected and len(found) == 3
    assert {r["_sync_state"] for r in found} == {"buffered", "committed", "failed"}
    late = next(r for r in found if r["id"] == rows.files["after_midnight_committed"])
    assert late["night"] == rows.night


def test_observations_by_status_per_night(base, rows):
    found = canned(base, "observations_by_status_per_night")
    assert found == [
        {"night": rows.night, "observations": 2, "completed": 1, "running": 1, "failed": 0, "aborted": 0, "not_replicated": 1},
        {"night": rows.earlier_night, "observations": 1, "completed": 0, "running": 0, "failed": 1, "aborted": 0, "not_replicated": 0},
    ]


def test_housekeeping_of_a_sensor_over_a_time_range(base, rows):
    found = canned(base, "housekeeping_for_sensor", sensor="mixer_temperature", start=rows.samples[1], end=rows.samples[3])
    assert [r["sampled_at"] for r in found] == rows.samples[1:3]
    assert {(r["sensor"], r["unit"], r["module"], r["instrument"]) for r in found} == {("mixer_temperature", "K", "LFA", "CHAI")}
    typed = canned(base, "housekeeping_for_sensor", sensor="mixer_temperature", start=rows.sample_minutes[2], end="")
    assert [(r["sampled_at"], r["_sync_state"]) for r in typed][-1] == (rows.samples[4], "buffered")
    assert [r["sampled_at"] for r in typed] == rows.samples[2:]
    assert canned(base, "housekeeping_for_sensor", sensor="no_such_sensor", start="", end="") == []


# --- read-only --------------------------------------------------------------------------------------


def test_writes_are_refused(base, rows, site):
    model_path = site[2]
    before = sqlite3.connect(model_path).execute("SELECT count(*) FROM raw_data_file").fetchone()[0]
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("files_not_replicated", "raw_data_file", f"raw_data_file/{rows.files['evening_buffered']}"):
            response = httpx.request(method, f"{base}/{DB}/{path}", data={"sql": "DELETE FROM raw_data_file"}, timeout=10)
            assert response.status_code == 403, (method, path, response.status_code)
    for sql in (
        "DELETE FROM raw_data_file",
        "INSERT INTO instrument (id, name) VALUES ('x', 'y')",
        "UPDATE raw_data_file SET _sync_state = 'replicated'",
        "DROP TABLE raw_data_file",
    ):
        response = httpx.get(f"{base}/{DB}.json", params={"sql": sql}, timeout=10)
        assert response.status_code == 400, (sql, response.status_code)
    assert httpx.post(f"{base}/{DB}", data={"sql": "DELETE FROM raw_data_file"}, timeout=10).status_code == 403
    queries = get_json(f"{base}/{DB}.json")["queries"]
    assert queries and not [q["name"] for q in queries if q.get("write")]
    plugins = {p["name"] for p in get_json(f"{base}/-/plugins.json")}
    assert not [name for name in plugins if "upload" in name or "write" in name or "insert" in name]
    assert httpx.get(f"{base}/-/upload-csvs", timeout=10).status_code == 404
    assert sqlite3.connect(model_path).execute("SELECT count(*) FROM raw_data_file").fetchone()[0] == before


# --- row pages ---------------------------------------------------------------------------------------


def test_observation_row_links_to_its_files_and_package(base, rows):
    page = httpx.get(f"{base}/{DB}/executed_obs_unit/{rows.evening}", timeout=10)
    assert page.status_code == 200
    html = page.text
    assert "Links from other tables" in html
    assert f'href="/{DB}/raw_data_file?executed_obs_unit_id={rows.evening}"' in html
    assert f'href="/{DB}/raw_data_package?executed_obs_unit_id={rows.evening}"' in html
    links = html.split("Links from other tables")[1]
    assert "2 rows</a>\n                from executed_obs_unit_id in raw_data_file" in links
    assert "1 row</a>\n                from executed_obs_unit_id in raw_data_package" in links
    files = canned_table(base, "raw_data_file", executed_obs_unit_id=rows.evening)
    assert {f["id"] for f in files} == {rows.files["evening_replicated"], rows.files["evening_buffered"]}


def test_referencing_cells_link_to_their_rows(base, rows):
    html = httpx.get(f"{base}/{DB}/raw_data_file/{rows.files['evening_replicated']}", timeout=10).text
    assert f'<a href="/{DB}/executed_obs_unit/{rows.evening}">{rows.evening}</a>' in html
    assert f'<a href="/{DB}/raw_data_package/{rows.package}">{rows.package}</a>' in html
    table = httpx.get(f"{base}/{DB}/executed_obs_unit", timeout=10).text
    assert f'<a href="/{DB}/instrument_module/{rows.module}">{rows.module}</a>' in table


def canned_table(base: str, table: str, **filters) -> list[dict]:
    return get_json(f"{base}/{DB}/{table}.json", _shape="array", **filters)


# --- dashboard -----------------------------------------------------------------------------------------


def dashboard_charts() -> dict:
    """Every chart of the engine's sync dashboard and the observatory's own."""
    boards = metadata()["plugins"]["datasette-dashboards"]
    return boards["sync"]["charts"] | boards["observatory"]["charts"]


def chart_rows(base: str, chart: dict) -> list[dict]:
    """What the dashboard's JavaScript fetches for a chart (datasette-dashboards' getDataUrl)."""
    url = f"{base}/{chart['db']}.json?" + urlencode({"sql": chart["query"], "_shape": "objects"})
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["rows"]


def test_dashboard_pages_render_every_chart(base):
    for board, charts in metadata()["plugins"]["datasette-dashboards"].items():
        response = httpx.get(f"{base}/-/dashboards/{board}", timeout=10)
        assert response.status_code == 200
        for slug in charts["charts"]:
            assert f'id="chart-{slug}"' in response.text and f"renderChart('{slug}'" in response.text, slug
    assert httpx.get(f"{base}/-/dashboards", timeout=10).status_code == 200
    assert httpx.get(f"{base}/-/dashboards/observatory/records-per-hour", timeout=10).status_code == 200


def test_dashboard_chart_data(base, rows):
    charts = dashboard_charts()
    assert chart_rows(base, charts["not-replicated"]) == [{"records": 1 + 3 + 1}]  # observation, files, housekeeping
    per_hour = chart_rows(base, charts["records-per-hour"])
    states = {r["sync_state"] for r in per_hour}
    assert {"buffered", "committed", "replicated", "failed"} <= states
    recent_files_and_samples = sum(r["records"] for r in per_hour)
    assert recent_files_and_samples >= 5 + 1 + 10  # files and the package (keys made now) and the samples
    depth = chart_rows(base, charts["buffer-depth"])
    assert depth and max(r["buffered"] for r in depth) == 40 and all(r["time"].endswith("0:00Z") for r in depth)
    lag = chart_rows(base, charts["replica-lag"])
    assert lag and max(r["replica_lag_s"] for r in lag) == pytest.approx(0.6)
    nights = {(r["night"], r["status"]): r["observations"] for r in chart_rows(base, charts["observations-per-night"])}
    assert nights == {(rows.night, "completed"): 1, (rows.night, "running"): 1, (rows.earlier_night, "failed"): 1}
