"""What the page shows, as plain values for the template: each figure with its text and colour, and the chart.

Each figure carries its raw value (``data-value`` in the page, so a test or a script can compare it
with ``opsync status --json``) and the level of its finding (the colour).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from opsync.monitoring.alerts import Finding, Level
from opsync.monitoring.capacity import Forecast, duration
from opsync_airflow.ui.site import Snapshot

CHART_WIDTH, CHART_HEIGHT = 720, 120


@dataclass(frozen=True)
class Figure:
    key: str  # the finding's figure name (opsync.monitoring.alerts.FIGURES)
    label: str
    value: float | int | None
    text: str
    level: str  # ok, warn or critical: the colour
    message: str  # the finding, shown on hover


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str  # the tooltip: "23:05 UTC: 120 records"
    count: int


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    total: int
    start: str
    end: str


def count(value: int) -> str:
    return f"{value:,}"


def ago(seconds: float) -> str:
    return f"{duration(seconds)} ago"


def size(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit} ({value:,} bytes)"
    return f"{value:,} bytes"


def figures(snapshot: Snapshot) -> list[Figure]:
    status, b, metrics = snapshot.status, snapshot.status.buffer, snapshot.metrics
    lag_s = status.lag_s
    rows: list[tuple[str, str, float | int | None, Callable]] = [
        ("depth", "Buffered", b and b.depth, lambda v: f"{v:,} ({b.pending:,} claimed by a drainer)"),
        ("buffer_oldest_age_s", "Oldest buffered", b and b.oldest_age_s, duration),
        ("awaiting_replica", "Committed, not replicated", b and b.awaiting_replica, count),
        ("lag_bytes", "Replica lag", status.lag_bytes, size),
        ("lag_s", "Replica lag in time", lag_s, lambda v: f"{v:.1f} s"),
        ("dead_letters", "Dead letters", b and b.dead_letters, count),
        ("drain_failed_runs", "Drain runs failed in a row", metrics and metrics.failed_runs_consecutive, count),
        ("last_drain_s", "Last successful drain", b and b.last_drain_s, ago),
        ("last_confirm_s", "Last confirm", b and b.last_confirm_s, ago),
        ("poison_rows", "Rows the read model skips", status.read_model.poison_rows, count),
        ("read_model_freshness_s", "Read model behind by", status.read_model.freshness_s, duration),
        ("replica_slot", "Replica slot WAL reserve", status.slot and status.slot.safe_wal_size, lambda v: status.slot.describe()),
    ]
    shown = [figure(key, label, value, show, snapshot.findings[key], b is not None) for key, label, value, show in rows]
    if status.slot is not None and status.slot.safe_wal_size is None:  # lost, missing, no limit: no figure, but known
        shown[-1] = replace(shown[-1], text=status.slot.describe())
    c = status.capacity
    if c is not None:
        shown += [forecast("high_water", "High-water mark in", c.high_water), forecast("drain_eta", "Drain ETA", c.drain_eta)]
    return shown


def forecast(key: str, label: str, f: Forecast) -> Figure:
    """A forecast has no alert rule: neutral, its reason on hover; ``data-value`` empty unless it is a finite time."""
    value = f.as_json()["seconds"]
    text = duration(value) if f.state == "due" else f.state
    return Figure(key, label, value, text, str(Level.ok), f.why)


def figure(key: str, label: str, value, show: Callable, finding: Finding, buffer_known: bool) -> Figure:
    if value is not None:
        text = show(value)
    elif key.startswith("last_") and buffer_known:
        text = "never"
    else:
        text = "unavailable"
    return Figure(key, label, value, text, str(finding.level), finding.message)


def chart(rate: list[tuple[int, int]]) -> Chart | None:
    """One bar per minute, scaled to the busiest minute (at least 1, so an idle hour draws flat, not divided by 0)."""
    if not rate:
        return None
    peak = max(max(n for _, n in rate), 1)
    width = CHART_WIDTH / len(rate)
    bars = []
    for i, (minute, n) in enumerate(rate):
        height = CHART_HEIGHT * n / peak
        bars.append(
            Bar(
                round(i * width, 2),
                round(CHART_HEIGHT - height, 2),
                round(width * 0.85, 2),
                round(height, 2),
                f"{clock(minute)} UTC: {n:,} records",
                n,
            )
        )
    return Chart(bars, peak, sum(n for _, n in rate), clock(rate[0][0]), clock(rate[-1][0]))


def clock(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M")
