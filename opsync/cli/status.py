"""``opsync status``: the site's figures once, or redrawn with ``--watch``; degraded (exit 3) past a ``--max-*`` limit."""

import json
import time as clock
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from opsync.cli.common import DEGRADED, console, json_option
from opsync.cli.services import measuring_engine, site_buffer
from opsync.config import get_settings
from opsync.connections import Database
from opsync.monitoring.status import SiteStatus, site_status


@dataclass(frozen=True)
class Limits:
    """``status --max-*``: figures past which the site counts as degraded (exit 3), for monitoring scripts."""

    depth: int | None = None
    age: float | None = None
    lag: float | None = None
    dead_letters: int | None = None

    def passed(self, report: SiteStatus) -> list[str]:
        """Each limit passed, in words; a figure that could not be measured is reported as unavailable instead."""
        b = report.buffer
        found = [
            (b and b.depth, self.depth, "transactions buffered", "--max-depth"),
            (b and b.oldest_age_s, self.age, "s the oldest has been buffered", "--max-age"),
            (report.lag_s, self.lag, "s replica lag", "--max-lag"),
            (b and b.dead_letters, self.dead_letters, "dead letters", "--max-dead-letters"),
        ]
        return [
            f"{value:g} {what} (over {option} {limit:g})"
            for value, limit, what, option in found
            if value is not None and limit is not None and value > limit
        ]


@click.command()
@click.option("--watch", is_flag=True, help="Redraw until Ctrl-C (or --count refreshes).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes of --watch.",
)
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="Stop --watch after N refreshes (implies --watch).")
@click.option("--max-depth", type=click.IntRange(min=0), help="Degraded when more transactions are buffered.")
@click.option("--max-age", type=click.FloatRange(min=0), metavar="SECONDS", help="Degraded when the oldest buffered transaction is older.")
@click.option("--max-lag", type=click.FloatRange(min=0), metavar="SECONDS", help="Degraded when the replica lags more.")
@click.option("--max-dead-letters", type=click.IntRange(min=0), help="Degraded when more are dead-lettered.")
@json_option
def status(watch: bool, interval: float, count: int | None, as_json: bool, **limits: Any) -> None:
    """Buffer depth, oldest buffered age, committed-not-replicated, replica lag, dead letters.

    Exits 3 (degraded) when Redis, the primary or the replica cannot be reached (shown as
    unavailable) or a --max-* limit is passed; with --watch, as of the last refresh. With --watch
    --json, one JSON object per line per refresh.
    """
    settings = get_settings()
    watching, limit = watch or count is not None, Limits(**{k.removeprefix("max_"): v for k, v in limits.items()})
    buffer = site_buffer()
    primary_db = measuring_engine(Database.primary)
    replica_db = measuring_engine(Database.replica)
    degraded, shown = None, 0
    try:
        with Live(console=console(), auto_refresh=False) if watching and not as_json else nullcontext() as live:
            while True:
                report = site_status(buffer, primary_db, replica_db, slot=settings.site)
                passed = limit.passed(report)
                show_status(report, passed, as_json, live, one_line=watching)
                degraded, shown = report.degraded or bool(passed), shown + 1
                if not watching or shown == count:
                    break
                clock.sleep(interval)
    except KeyboardInterrupt:  # the way out of --watch
        if degraded is None:
            raise click.Abort() from None
    finally:
        buffer.client.close()
    if degraded:
        click.get_current_context().exit(DEGRADED)


def show_status(report: SiteStatus, passed: list[str], as_json: bool, live: Live | None, one_line: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_json() | {"limits_passed": passed}, indent=None if one_line else 2))
        return
    table = Table("", "", show_header=False, box=None, title=f"opsync status at {datetime.fromisoformat(report.at):%Y-%m-%d %H:%M:%S} UTC")
    for figure, value in status_rows(report) + [("limit passed", f"[red]{what}[/]") for what in passed]:
        table.add_row(figure, value)
    if live is None:
        console().print(table)
    else:
        live.update(table, refresh=True)


def ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s ago"


def status_rows(report: SiteStatus) -> list[tuple[str, str]]:
    b, rows = report.buffer, []
    if b is not None:
        rows += [
            ("buffered", f"{b.depth} ({b.pending} claimed by a drainer)"),
            ("oldest buffered", f"{b.oldest_age_s:.0f} s"),
            ("committed, not replicated", str(b.awaiting_replica)),
            ("dead letters", str(b.dead_letters) + (" (see opsync dlq list)" if b.dead_letters else "")),
            ("last drain", ago(b.last_drain_s)),
            ("last confirm", ago(b.last_confirm_s)),
        ]
    lag = "unknown" if report.lag_bytes is None else f"{report.lag_bytes} bytes"
    if report.lag_s is not None:
        lag += f", {report.lag_s:.1f} s"
    if report.lag_from == "slot":
        lag += " (from the replication slot: the replica is down)"
    rows.append(("replica lag", lag))
    if report.slot is not None:
        rows.append(("replica slot", f"{report.slot.name}: {report.slot.describe()}"))
    rows += capacity_rows(report)
    rows += read_model_rows(report)
    rows += [(part, f"[red]unavailable[/]: {why}") for part, why in report.unavailable.items()]
    return rows


def capacity_rows(report: SiteStatus) -> list[tuple[str, str]]:
    """The forecasts: when the high-water mark comes at this ingest rate, when the backlog is replicated."""
    c = report.capacity
    if c is None:
        return []
    rate = "unknown" if c.ingest_per_s is None else f"{c.ingest_per_s:.3g} transactions/s"
    if c.bytes_per_txn is not None:
        rate += f", {c.bytes_per_txn:,.0f} bytes each (measured over {c.bytes_measured_over:,})"
    return [
        ("ingest", rate),
        ("high-water in", escape(c.high_water.describe())),
        ("room", f"{c.room:,} transactions before the high-water mark"),
        ("drain ETA", escape(c.drain_eta.describe())),
    ]


def read_model_rows(report: SiteStatus) -> list[tuple[str, str]]:
    """Freshness, and the rows the publisher skips with the latest few keys and reasons."""
    rm = report.read_model
    fresh = "unknown" if rm.freshness_s is None else f"{rm.freshness_s:.1f} s behind"
    rows = [("read model", fresh + "".join(f" ({part}: {why})" for part, why in rm.unavailable.items()))]
    if rm.poison_rows is not None:
        skipped = f"{rm.poison_rows} now ({rm.poison_skipped} since counting began)"
        rows.append(("poison rows skipped", f"[red]{skipped}[/]" if rm.poison_rows else skipped))
    rows += [("  skipped", escape(f"{p.table} {p.key} ({p.duty}, {p.at[:19]}Z): {p.reason}")) for p in rm.recent]
    return rows
