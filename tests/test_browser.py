"""Headless Chromium (Debian ``chromium``, installed by scripts/bootstrap.sh) loads the sync dashboard,
a table page and an observation's row page from a real ``datasette serve``, and the test checks what
it rendered: the DOM after scripts ran (charts are Vega SVGs whose marks carry the data in their
aria-labels), the browser console (no uncaught exceptions, failed loads or errors), and a screenshot
kept as an artifact (under the pytest temporary directory, and in ``$OPSYNC_ARTIFACTS_DIR`` if set).

The browser runs in the site's time zone, so the UTC axes are checked to stay UTC for viewers in Chile.
"""

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsync.read_model import metadata as served_metadata
from tests.test_datasette_views import DB, METADATA, SITE_TZ, datasette_site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SKIP_BROWSER = "OPSYNC_SKIP_BROWSER_TESTS"  # =1: an explicit opt-out where no browser can be installed
OPTED_OUT = pytest.mark.skipif(os.environ.get(SKIP_BROWSER) == "1", reason=f"{SKIP_BROWSER}=1")
pytestmark = OPTED_OUT


@pytest.fixture(scope="module", autouse=True)
def chromium_installed() -> None:
    """scripts/bootstrap.sh installs Chromium, so a missing one is a broken set-up: a failure, not a skip."""
    if CHROMIUM is None:
        pytest.fail(f"Debian chromium is not installed: run scripts/bootstrap.sh, or set {SKIP_BROWSER}=1 to skip browser tests")


WINDOW = (1400, 1800)
VIRTUAL_TIME_MS = 15000  # charts render after their data fetches: let virtual time run past them
CONSOLE = re.compile(r":CONSOLE(?::\d+)?\] \"(?P<message>.*)\", source: (?P<source>.*)$")
CONSOLE_ERROR = re.compile(r"Uncaught|Failed to load resource|\b\w*Error\b|\berror\b", re.IGNORECASE)


@dataclass
class Rendered:
    dom: str
    console: list[str]
    screenshot: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with datasette_site(tmp_path_factory.mktemp("browser-site")) as (base, rows, _):
        yield base, rows


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser-artifacts")


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "TZ": SITE_TZ})


def render(url: str, name: str, artifacts: Path) -> Rendered:
    """Load ``url`` twice (Chromium does one of --dump-dom and --screenshot per run): the DOM and console, then the picture."""
    profile = artifacts / f"profile-{name}"
    dumped = chromium(["--dump-dom", url], profile)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    console = [m.group("message") + " @ " + m.group("source") for m in map(CONSOLE.search, dumped.stderr.splitlines()) if m]
    screenshot = artifacts / f"{name}.png"
    shot = chromium([f"--screenshot={screenshot}", url], profile)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    if os.environ.get("OPSYNC_ARTIFACTS_DIR"):
        keep = Path(os.environ["OPSYNC_ARTIFACTS_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, keep / screenshot.name)
    return Rendered(dumped.stdout, console, screenshot)


def console_errors(rendered: Rendered) -> list[str]:
    return [line for line in rendered.console if CONSOLE_ERROR.search(line)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def element(dom: str, element_id: str) -> str:
    """The markup from the element with ``element_id`` up to the next chart card (enough for these checks)."""
    start = dom.index(f'id="{element_id}"')
    end = dom.find('class="dashboard-card"', start)
    return dom[start : end if end != -1 else len(dom)]


def labels(markup: str) -> list[str]:
    return re.findall(r'aria-label="([^"]*)"', markup)


def test_dashboards_render_their_charts_with_data_and_no_console_errors(site, artifacts):
    """The engine's sync dashboard and the observatory's own."""
    base, rows = site
    drawn = {}
    for board, dashboard in served_metadata.merged(METADATA)["plugins"]["datasette-dashboards"].items():
        rendered = render(f"{base}/-/dashboards/{board}", f"dashboard-{board}", artifacts)
        assert not console_errors(rendered), console_errors(rendered)
        for slug, chart in dashboard["charts"].items():
            card = drawn[slug] = element(rendered.dom, f"chart-{slug}")
            if chart["library"] == "vega-lite":
                assert "<svg" in card and 'class="marks"' in card, f"{slug}: no chart drawn"
        assert png_size(rendered.screenshot) == WINDOW and rendered.screenshot.stat().st_size > 20_000
    assert re.search(r"<p[^>]*>5</p>", drawn["not-replicated"]), "the metric is missing"

    per_hour = labels(drawn["records-per-hour"])
    for state in ("buffered", "committed", "replicated", "failed"):
        assert any(f"Sync state: {state}" in label and "Records:" in label for label in per_hour), f"no {state} bar"

    depth = labels(drawn["buffer-depth"])
    peak = [label for label in depth if "Transactions: 40" in label and "figure: buffered" in label]
    assert peak, depth
    nights = labels(drawn["observations-per-night"])
    assert any(f"Night (local date it began): {rows.night}" in label and "Observations: 1" in label for label in nights), nights


def test_dashboard_times_stay_utc_in_another_time_zone(site, artifacts):
    """The browser runs in the site's zone (Chile, UTC-3): axes and tooltips titled UTC must show UTC times."""
    base, rows = site
    rendered = render(f"{base}/-/dashboards/sync", "dashboard-utc", artifacts)
    peak = datetime.fromisoformat(rows.depth_peak_at).astimezone(UTC)
    bucket = peak.replace(minute=peak.minute // 10 * 10).strftime("%d %b %H:%M")  # the chart's 10-minute bucket, in UTC
    depth = labels(element(rendered.dom, "chart-buffer-depth"))
    assert f"Time (UTC): {bucket}; Transactions: 40; figure: buffered" in depth, depth


def test_table_page_renders_rows_facets_and_descriptions(site, artifacts):
    base, rows = site
    rendered = render(f"{base}/{DB}/executed_obs_unit", "executed_obs_unit", artifacts)
    assert not console_errors(rendered), console_errors(rendered)
    dom = rendered.dom
    assert "Executed observations" in dom
    body = dom.split('<table class="rows-and-columns">', 1)[1].split("</table>", 1)[0]
    assert body.count("<tr") == 1 + 3  # the header and the three observations
    for key in (rows.after_midnight, rows.evening, rows.night_before):
        assert key in body
    assert body.index(rows.after_midnight) < body.index(rows.evening) < body.index(rows.night_before)  # newest first
    for facet in ("night", "status", "instrument_module_id", "_sync_state"):
        assert f'data-column="{facet}"' in dom, f"facet {facet} not shown"
    assert "Observing night" in dom  # column description
    assert png_size(rendered.screenshot) == WINDOW


def test_observation_row_page_links_to_its_files_and_package(site, artifacts):
    base, rows = site
    rendered = render(f"{base}/{DB}/executed_obs_unit/{rows.evening}", "executed_obs_unit-row", artifacts)
    assert not console_errors(rendered), console_errors(rendered)
    links = rendered.dom.split("Links from other tables", 1)[1]
    assert f'href="/{DB}/raw_data_file?executed_obs_unit_id={rows.evening}"' in links
    assert f'href="/{DB}/raw_data_package?executed_obs_unit_id={rows.evening}"' in links
