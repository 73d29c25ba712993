"""Alert rules over the site's figures: each figure is ``ok``, ``warn`` or ``critical`` by configurable thresholds.

:func:`evaluate` judges one measurement (:class:`opsync.monitoring.status.SiteStatus` and
:class:`opsync.monitoring.drain_metrics.DrainMetrics`); the Airflow page colours figures with it and the alerts
DAG notifies from it. So that a problem is announced once and not every minute, the level last
announced per figure is kept in Redis (:func:`due`, :func:`mark_sent`): only a change is sent, and a
figure back to ``ok`` is sent as resolved. A figure that cannot be measured (its part unreachable)
is ``warn``, never ``ok``: not knowing is worth a look. The last full evaluation is kept in Redis too
(:func:`store_findings`), so the Datasette dashboard shows the same findings without measuring again.
"""

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsync.buffer import Buffer
from opsync.monitoring.drain_metrics import DrainMetrics
from opsync.monitoring.status import SiteStatus
from opsync.read_model.figures import ReadModelFigures


class Thresholds(BaseSettings):
    """A figure at or above its ``warn`` level warns, at or above ``critical`` is critical; None (``none`` in the
    environment) switches a level off."""

    model_config = SettingsConfigDict(env_prefix="OPSYNC_ALERT_", env_file=".env", extra="ignore", env_parse_none_str="none")

    buffer_age_warn_min: float | None = Field(15, description="Oldest buffered (unsent) transaction, minutes")
    buffer_age_critical_min: float | None = Field(120, description="Oldest buffered (unsent) transaction, minutes")
    depth_warn: int | None = Field(100_000, description="Buffered transactions not yet acknowledged by the drainer")
    depth_critical: int | None = Field(1_000_000, description="Buffered transactions not yet acknowledged by the drainer")
    awaiting_replica_warn: int | None = Field(10_000, description="Committed in the primary, not yet replayed by the replica")
    awaiting_replica_critical: int | None = Field(100_000, description="Committed in the primary, not yet replayed by the replica")
    lag_bytes_warn: int | None = Field(64 * 2**20, description="Replica behind the primary, bytes of WAL")
    lag_bytes_critical: int | None = Field(2**30, description="Replica behind the primary, bytes of WAL")
    lag_warn_s: float | None = Field(300, description="Replica behind the primary, seconds since it replayed a transaction")
    lag_critical_s: float | None = Field(1800, description="Replica behind the primary, seconds since it replayed a transaction")
    dead_letters_warn: int | None = Field(None, description="Transactions that failed for good (dead letters)")
    dead_letters_critical: int | None = Field(1, description="Transactions that failed for good: any is critical")
    drain_failed_runs_warn: int | None = Field(3, description="Drain runs failed in a row")
    drain_failed_runs_critical: int | None = Field(10, description="Drain runs failed in a row")
    last_drain_warn_s: float | None = Field(300, description="Since a drain run last finished, seconds")
    last_drain_critical_s: float | None = Field(1800, description="Since a drain run last finished, seconds")
    last_confirm_warn_s: float | None = Field(
        600, description="Since the last confirmation against the replica while transactions await it, seconds"
    )
    last_confirm_critical_s: float | None = Field(
        3600, description="Since the last confirmation against the replica while transactions await it, seconds"
    )
    poison_rows_warn: int | None = Field(1, description="Rows the read-model publisher skips (cannot render or write them)")
    poison_rows_critical: int | None = Field(None, description="Rows the read-model publisher skips")
    read_model_freshness_warn_s: float | None = Field(
        120, description="Age of the oldest change the read model (Datasette) does not show yet, seconds"
    )
    read_model_freshness_critical_s: float | None = Field(
        900, description="Age of the oldest change the read model (Datasette) does not show yet, seconds"
    )
    slot_safe_wal_warn_fraction: float | None = Field(
        0.5,
        description="The replica's slot: WAL the primary may still write before dropping it, as a fraction of"
        " max_slot_wal_keep_size; at or below it warns (unreserved and lost are always critical)",
    )
    slot_safe_wal_critical_fraction: float | None = Field(
        0.2, description="The replica's slot: fraction of max_slot_wal_keep_size left at or below which it is critical"
    )


class Level(StrEnum):
    ok = "ok"
    warn = "warn"
    critical = "critical"


@dataclass(frozen=True)
class Finding:
    figure: str  # one of FIGURES
    value: float | int | None  # None: could not be measured
    level: Level
    message: str  # one line for a person: the value, its unit and the threshold it reached


FIGURES = (
    "buffer_oldest_age_s",
    "depth",
    "awaiting_replica",
    "lag_bytes",
    "lag_s",
    "dead_letters",
    "drain_failed_runs",
    "last_drain_s",
    "last_confirm_s",
    "poison_rows",
    "read_model_freshness_s",
    "replica_slot",
)


@dataclass(frozen=True)
class Rule:
    figure: str
    what: str  # the figure in words
    unit: str
    scale: float  # threshold units per figure unit (minutes: 1/60 of the seconds measured)
    warn: float | None
    critical: float | None


def rules(t: Thresholds) -> dict[str, Rule]:
    return {
        r.figure: r
        for r in (
            Rule("buffer_oldest_age_s", "oldest buffered transaction", "min", 1 / 60, t.buffer_age_warn_min, t.buffer_age_critical_min),
            Rule("depth", "buffered transactions", "", 1, t.depth_warn, t.depth_critical),
            Rule("awaiting_replica", "committed, not yet replicated", "", 1, t.awaiting_replica_warn, t.awaiting_replica_critical),
            Rule("lag_bytes", "replica lag", "bytes", 1, t.lag_bytes_warn, t.lag_bytes_critical),
            Rule("lag_s", "replica lag", "s", 1, t.lag_warn_s, t.lag_critical_s),
            Rule("dead_letters", "dead letters", "", 1, t.dead_letters_warn, t.dead_letters_critical),
            Rule("drain_failed_runs", "drain runs failed in a row", "", 1, t.drain_failed_runs_warn, t.drain_failed_runs_critical),
            Rule("last_drain_s", "since the last drain", "s", 1, t.last_drain_warn_s, t.last_drain_critical_s),
            Rule("last_confirm_s", "since the last confirmation", "s", 1, t.last_confirm_warn_s, t.last_confirm_critical_s),
            Rule("poison_rows", "rows the read model skips", "", 1, t.poison_rows_warn, t.poison_rows_critical),
            Rule(
                "read_model_freshness_s", "read model behind by", "s", 1, t.read_model_freshness_warn_s, t.read_model_freshness_critical_s
            ),
        )
    }


def evaluate(status: SiteStatus, metrics: DrainMetrics, thresholds: Thresholds) -> list[Finding]:
    """One finding per figure of :data:`FIGURES`, in that order."""
    measured = figures(status, metrics)
    found = [judge(rule, *measured[figure]) for figure, rule in rules(thresholds).items()]
    found = [with_latest(f, status.read_model) if f.figure == "poison_rows" else f for f in found]
    return [*found, judge_slot(status, thresholds)]


def judge_slot(status: SiteStatus, t: Thresholds) -> Finding:
    """Before ``max_slot_wal_keep_size`` drops the replica's slot: its WAL reserve as a fraction of the limit is
    judged low-is-bad; ``unreserved`` (past the limit, dropped at the next checkpoint) and ``lost`` are critical."""
    slot = status.slot
    if slot is None:
        why = status.unavailable.get("primary", "not measured")
        return Finding("replica_slot", None, Level.warn, f"replica slot unknown (primary: {why})")
    name = f"replica slot {slot.name}"
    if not slot.exists:
        return Finding(
            "replica_slot",
            None,
            Level.critical,
            f"{name} does not exist on the primary: the replica cannot"
            " stream through it (create it and clone the replica again, see README)",
        )
    if slot.wal_status == "lost":
        return Finding(
            "replica_slot",
            None,
            Level.critical,
            f"{name} lost: the primary removed WAL the replica still needed; clone the replica again (see README)",
        )
    if slot.wal_status == "unreserved":
        return Finding(
            "replica_slot",
            slot.safe_wal_size,
            Level.critical,
            f"{name} unreserved: past"
            f" max_slot_wal_keep_size ({slot.max_keep:,} bytes), lost at the next checkpoint unless the"
            " replica catches up",
        )
    fraction = slot.safe_fraction
    if fraction is None:
        why = "reserves no WAL yet" if slot.wal_status is None else "no max_slot_wal_keep_size: WAL kept without limit"
        return Finding("replica_slot", slot.safe_wal_size, Level.ok, f"{name}: {why}")
    text = f"{name}: {slot.wal_status}, {slot.safe_wal_size:,} bytes of WAL ({fraction:.0%} of max_slot_wal_keep_size) before it is dropped"
    for level, threshold in ((Level.critical, t.slot_safe_wal_critical_fraction), (Level.warn, t.slot_safe_wal_warn_fraction)):
        if threshold is not None and fraction <= threshold:
            return Finding("replica_slot", slot.safe_wal_size, level, f"{text} ({level} at {threshold:.0%})")
    return Finding("replica_slot", slot.safe_wal_size, Level.ok, text)


def figures(status: SiteStatus, metrics: DrainMetrics) -> dict[str, tuple[float | int | None, str | None, bool]]:
    """Each figure's value, why it is unknown when it is None, and whether its rule applies now."""
    b = status.buffer
    down = status.unavailable.get("redis")
    unknown = f"site buffer (Redis) unavailable: {down}" if down else None
    awaiting = bool(b and b.awaiting_replica)
    lag = unknown_lag(status)
    rm = status.read_model
    read_model_unknown = (
        unknown
        or "read model figures unknown (" + ("; ".join(f"{part}: {why}" for part, why in rm.unavailable.items()) or "not measured") + ")"
    )
    return {
        "buffer_oldest_age_s": (b and b.oldest_age_s, unknown, True),
        "depth": (b and b.depth, unknown, True),
        "awaiting_replica": (b and b.awaiting_replica, unknown, True),
        "lag_bytes": (status.lag_bytes, lag, True),
        "lag_s": (status.lag_s, lag, True),
        "dead_letters": (b and b.dead_letters, unknown, True),
        "drain_failed_runs": (None if down else metrics.failed_runs_consecutive, unknown, True),  # counted in Redis
        "last_drain_s": (b and b.last_drain_s, unknown or "no drain run has finished yet", True),
        "last_confirm_s": (
            b and b.last_confirm_s,
            unknown or "no confirmation yet while transactions await the replica",
            awaiting or b is None,
        ),
        "poison_rows": (rm.poison_rows, read_model_unknown, True),
        "read_model_freshness_s": (rm.freshness_s, read_model_unknown, True),
    }


def with_latest(finding: Finding, read_model: ReadModelFigures) -> Finding:
    """Poison rows are named by the latest one skipped, its table, key and reason: where to look first."""
    if not finding.value or not read_model.recent:
        return finding
    p = read_model.recent[0]
    return replace(finding, message=f"{finding.message}; latest: {p.table} {p.key} ({p.duty}: {p.reason})")


def unknown_lag(status: SiteStatus) -> str:
    why = "; ".join(f"{part}: {reason}" for part, reason in status.unavailable.items() if part in ("primary", "replica"))
    return f"replica lag unknown ({why or 'no replay position'})"


def judge(rule: Rule, value: float | int | None, unknown: str | None, applies: bool = True) -> Finding:
    if not applies:
        return Finding(rule.figure, value, Level.ok, f"{rule.what}: {shown(value, rule)} (nothing waits for it)")
    if value is None:
        return Finding(rule.figure, None, Level.warn, unknown or f"{rule.what} unknown")
    unit = f" {rule.unit}" if rule.unit else ""
    for level, threshold in ((Level.critical, rule.critical), (Level.warn, rule.warn)):
        if threshold is not None and value * rule.scale >= threshold:
            return Finding(rule.figure, value, level, f"{rule.what}: {shown(value, rule)} ({level} at {number(threshold)}{unit})")
    return Finding(rule.figure, value, Level.ok, f"{rule.what}: {shown(value, rule)}")


def shown(value: float | int | None, rule: Rule) -> str:
    """The value in the rule's unit, as a person reads it: ``17 min``, ``1,024 bytes``, ``0.4 s``."""
    if value is None:
        return "never"
    text = number(value * rule.scale)
    return f"{text} {rule.unit}" if rule.unit else text


def number(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 or x == int(x) else f"{x:.1f}"


@dataclass(frozen=True)
class Change:
    """A figure whose level differs from the one last announced."""

    finding: Finding
    previous: Level

    @property
    def resolved(self) -> bool:
        return self.finding.level is Level.ok


def sent_key(buffer: Buffer) -> str:
    return buffer.alerts_sent


def due(buffer: Buffer, findings: Iterable[Finding]) -> list[Change]:
    """The findings whose level changed since last announced (a figure never announced counts as ``ok``)."""
    findings = list(findings)
    sent = buffer.client.hmget(sent_key(buffer), [f.figure for f in findings]) if findings else []
    changes = []
    for finding, previous in zip(findings, sent, strict=True):
        before = Level(previous.decode()) if previous else Level.ok  # type: ignore[union-attr]  # bytes: no decode_responses
        if finding.level is not before:
            changes.append(Change(finding, before))
    return changes


def mark_sent(buffer: Buffer, changes: Iterable[Change]) -> None:
    """Remember what was announced, once it was delivered: a failed delivery is retried at the next evaluation."""
    levels = {c.finding.figure: str(c.finding.level) for c in changes}
    if levels:
        buffer.client.hset(sent_key(buffer), mapping=levels)  # type: ignore[arg-type]  # redis-py's Mapping key is invariant


def announce(buffer: Buffer, findings: Iterable[Finding], deliver: Callable[[list[Change]], None]) -> list[Change]:
    """Deliver what changed, then remember it; returns what was delivered (nothing when nothing changed)."""
    changes = due(buffer, findings)
    if changes:
        deliver(changes)
        mark_sent(buffer, changes)
    return changes


def findings_key(buffer: Buffer) -> str:
    return buffer.alerts_findings


def store_findings(buffer: Buffer, at: str, findings: Iterable[Finding]) -> None:
    """Keep the latest evaluation (one small key, overwritten) for readers that do not measure themselves."""
    buffer.client.set(findings_key(buffer), json.dumps({"at": at, "findings": [asdict(f) for f in findings]}))


def stored_findings(buffer: Buffer) -> tuple[str | None, list[Finding]]:
    """The latest stored evaluation and when it was made; ``(None, [])`` before the first."""
    stored = buffer.client.get(findings_key(buffer))
    if stored is None:
        return None, []
    document = json.loads(stored)
    return document["at"], [Finding(f["figure"], f["value"], Level(f["level"]), f["message"]) for f in document["findings"]]


def summary(site: str, changes: list[Change]) -> str:
    """The text of one alert message: the worst level first, one line per figure."""
    firing = [c for c in changes if not c.resolved]
    worst = max((c.finding.level for c in firing), key=list(Level).index, default=Level.ok)
    head = f"opsync {site}: {worst.upper()}" if firing else f"opsync {site}: resolved"
    lines = [
        f"{'RESOLVED' if c.resolved else c.finding.level.upper()} {c.finding.figure}: {c.finding.message}"
        + (f" (was {c.previous})" if not c.resolved and c.previous is not Level.ok else "")
        for c in sorted(changes, key=lambda c: -list(Level).index(c.finding.level))
    ]
    return "\n".join([head, *lines])


def payload(site: str, changes: list[Change], slack: bool = False) -> dict:
    """The webhook body: Slack-compatible ``{"text": ...}`` or a generic JSON document (which carries the text too)."""
    text = summary(site, changes)
    if slack:
        return {"text": text}
    return {
        "site": site,
        "text": text,
        "changes": [
            {
                "figure": c.finding.figure,
                "value": c.finding.value,
                "level": str(c.finding.level),
                "previous": str(c.previous),
                "resolved": c.resolved,
                "message": c.finding.message,
            }
            for c in changes
        ],
    }
