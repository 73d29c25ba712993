"""Prometheus alerting rules that judge the ingest API's ``/metrics`` as :mod:`opsync.monitoring.alerts` judges a measurement.

One rule per figure of :data:`opsync.monitoring.alerts.FIGURES` and level, at the thresholds of
:class:`opsync.monitoring.alerts.Thresholds` (a level switched off has no rule), with the same comparisons: a figure at or
above ``warn`` and below ``critical`` warns, at or above ``critical`` is critical (the slot's reserve: at or below,
and ``unreserved``, ``lost`` or missing are always critical). A figure ``/metrics`` cannot measure (its sample is
absent while the target answers) has a warning rule of its own, as alerts.py makes it ``warn``. One rule more has
no counterpart there: a target Prometheus cannot scrape, where every other rule would fall silent.

``opsync alert-rules`` prints the document for the thresholds in the environment, so a site that changes
``OPSYNC_ALERT_*`` regenerates its rules file; ``deploy/prometheus/opsync-rules.yml`` is it at the defaults.
"""

from dataclasses import dataclass

import yaml

from opsync.monitoring.alerts import Level, Rule, Thresholds, number, rules

UP = "opsync_buffer_up"  # on every scrape that answered, 0 or 1
SEVERITY = {Level.warn: "warning", Level.critical: "critical"}
RUNBOOK = 'README.md, "Metrics and alerts" (opsync status shows every figure with its reason)'
SLOT_GONE = 'opsync_replica_slot_wal_status{status=~"unreserved|lost|missing"} == 1'
SLOT_FRACTION = "opsync_replica_slot_safe_wal_bytes / (opsync_replica_slot_max_wal_keep_bytes > 0 < +Inf)"


def absent(metric: str) -> str:
    """Scraped, but without this figure: what alerts.py calls unknown."""
    return f"{UP} unless {metric}"


@dataclass(frozen=True)
class Figure:
    """How ``/metrics`` shows one figure of :func:`opsync.monitoring.alerts.rules`."""

    setting: str  # its Thresholds fields, ``{}`` the level: where the description and the variable name come from
    value: str  # PromQL: the figure in the unit alerts.py measures it in (seconds, bytes, transactions)
    why: str  # why alerts.py could not measure it, in its words
    shown: str = "humanize"  # the template function that shows a value
    unknown: str | None = None  # PromQL, non-empty when it cannot be measured; default: the value's metric is absent
    applies: str | None = None  # PromQL a value must also meet for its rule to apply (alerts.py's ``applies``)


REDIS_DOWN = "site buffer (Redis) unavailable"
READ_MODEL = "read model figures unknown (the site buffer or the replica unreachable, or the publisher not started)"
LAG = "replica lag unknown (the primary or the replica unreachable, or no replay position)"

SHOWN = {
    "buffer_oldest_age_s": Figure(
        "buffer_age_{}_min",
        "time() - opsync_buffer_oldest_enqueued_timestamp_seconds",
        REDIS_DOWN,
        "humanizeDuration",
        unknown=f"{UP} == 0",
    ),  # absent while empty: 0, ok
    "depth": Figure("depth_{}", "opsync_buffer_depth", REDIS_DOWN),
    "awaiting_replica": Figure("awaiting_replica_{}", "opsync_committed_not_replicated", REDIS_DOWN),
    "lag_bytes": Figure("lag_bytes_{}", "opsync_replica_lag_bytes", LAG, "humanize1024"),
    "lag_s": Figure("lag_{}_s", "opsync_replica_lag_seconds", LAG, "humanizeDuration"),
    "dead_letters": Figure("dead_letters_{}", "opsync_dead_letters", REDIS_DOWN),
    "drain_failed_runs": Figure("drain_failed_runs_{}", "opsync_drain_runs_failed_consecutive", REDIS_DOWN),
    "last_drain_s": Figure(
        "last_drain_{}_s",
        "time() - opsync_last_drain_timestamp_seconds",
        f"no drain run has finished yet, or the {REDIS_DOWN}",
        "humanizeDuration",
        unknown=absent("opsync_last_drain_timestamp_seconds"),
    ),
    "last_confirm_s": Figure(
        "last_confirm_{}_s",
        "time() - opsync_last_confirm_timestamp_seconds",
        f"no confirmation yet while transactions await the replica, or the {REDIS_DOWN}",
        "humanizeDuration",
        unknown=f"{UP} == 0 or opsync_committed_not_replicated > 0 unless opsync_last_confirm_timestamp_seconds",
        applies="opsync_committed_not_replicated > 0",
    ),
    "poison_rows": Figure("poison_rows_{}", "opsync_read_model_poison_rows", READ_MODEL),
    "read_model_freshness_s": Figure("read_model_freshness_{}_s", "opsync_read_model_freshness_seconds", READ_MODEL, "humanizeDuration"),
}


def document(thresholds: Thresholds, job: str = "opsync") -> dict:
    """The rules file: one group, ``job`` being the scrape job of the ingest API's ``/metrics``."""
    found = []
    for figure, rule in rules(thresholds).items():
        found += threshold_rules(rule, SHOWN[figure])
        found.append(unknown_rule(figure, SHOWN[figure].unknown or absent(SHOWN[figure].value), SHOWN[figure].why))
    found += slot_rules(thresholds)
    found.append(
        {
            "alert": "OpsyncMetricsDown",
            "expr": f'up{{job="{job}"}} == 0',
            "labels": {"severity": "warning", "figure": "scrape"},
            "annotations": {
                "summary": "the ingest API's /metrics did not answer: no other opsync rule can fire",
                "description": "Prometheus could not scrape {{ $labels.instance }}.",
                "runbook": RUNBOOK,
            },
        }
    )
    return {"groups": [{"name": "opsync", "rules": found}]}


def render(thresholds: Thresholds, job: str = "opsync") -> str:
    head = (
        "# Generated by `opsync alert-rules` from the OPSYNC_ALERT_* thresholds (opsync/monitoring/alerts.py); a site that\n"
        "# changes them regenerates this file. Do not edit by hand.\n"
    )
    return head + yaml.safe_dump(document(thresholds, job), sort_keys=False, width=1 << 16, allow_unicode=True)


def name(figure: str, suffix: str) -> str:
    return "Opsync" + "".join(part.capitalize() for part in figure.removesuffix("_s").split("_")) + suffix


def threshold_rules(rule: Rule, shown: Figure) -> list[dict]:
    found = []
    for level, threshold, below in ((Level.warn, rule.warn, rule.critical), (Level.critical, rule.critical, None)):
        if threshold is None:
            continue
        expr = f"{shown.value} >= {limit(threshold, rule)}" + ("" if below is None else f" < {limit(below, rule)}")
        if shown.applies:
            expr = f"({expr}) and {shown.applies}"
        unit = f" {rule.unit}" if rule.unit else ""
        setting = shown.setting.format(level.name)
        found.append(
            {
                "alert": name(rule.figure, SEVERITY[level].capitalize()),
                "expr": expr,
                "labels": {"severity": SEVERITY[level], "figure": rule.figure},
                "annotations": {
                    "summary": f"{rule.what}: {{{{ $value | {shown.shown} }}}} ({level} at {number(threshold)}{unit})",
                    "description": f"{Thresholds.model_fields[setting].description} (OPSYNC_ALERT_{setting.upper()})"
                    " on {{ $labels.instance }}.",
                    "runbook": RUNBOOK,
                },
            }
        )
    return found


def limit(threshold: float, rule: Rule) -> str:
    """The threshold in the unit the figure is exported in (alerts.py compares ``value * scale``)."""
    value = round(threshold / rule.scale, 9)
    return str(int(value)) if value == int(value) else repr(value)


def unknown_rule(figure: str, expr: str, why: str) -> dict:
    return {
        "alert": name(figure, "Unknown"),
        "expr": expr,
        "labels": {"severity": "warning", "figure": figure},
        "annotations": {
            "summary": f"{figure}: {why}",
            "description": f"{figure} cannot be measured on {{{{ $labels.instance }}}}: not knowing is worth a"
            " look (opsync/monitoring/alerts.py makes it warn).",
            "runbook": RUNBOOK,
        },
    }


def slot_rules(t: Thresholds) -> list[dict]:
    """alerts.judge_slot: the reserve as a fraction of ``max_slot_wal_keep_size`` (none with no limit), low is bad;
    a slot ``unreserved``, ``lost`` or missing is critical whatever its reserve."""
    warn, critical = t.slot_safe_wal_warn_fraction, t.slot_safe_wal_critical_fraction
    left = "replica slot: {{ $value | humanizePercentage }} of max_slot_wal_keep_size left before it is dropped"
    gone = (
        "replica slot {{ $labels.status }}: the primary drops it (unreserved: at the next checkpoint unless the"
        " replica catches up; lost or missing: clone the replica again, see README)"
    )
    if critical is None:
        found = [slot_rule(Level.critical, SLOT_GONE, gone)]
    else:
        found = [
            slot_rule(
                Level.critical,
                f"{SLOT_GONE} or ignoring(status) {SLOT_FRACTION} <= {critical!r}",
                f"{{{{ if $labels.status }}}}{gone}{{{{ else }}}}{left} (critical at {critical:.0%}){{{{ end }}}}",
            )
        ]
    if warn is not None:
        expr = f"{SLOT_FRACTION} <= {warn!r}" + ("" if critical is None else f" > {critical!r}")
        found.insert(0, slot_rule(Level.warn, f"({expr}) unless ignoring(status) {SLOT_GONE}", f"{left} (warn at {warn:.0%})"))
    found.append(unknown_rule("replica_slot", "opsync_replica_slot_up == 0", "replica slot unknown (the primary did not answer about it)"))
    return found


def slot_rule(level: Level, expr: str, summary: str) -> dict:
    return {
        "alert": name("replica_slot", SEVERITY[level].capitalize()),
        "expr": expr,
        "labels": {"severity": SEVERITY[level], "figure": "replica_slot"},
        "annotations": {
            "summary": summary,
            "description": f"{Thresholds.model_fields[f'slot_safe_wal_{level.name}_fraction'].description} on {{{{ $labels.instance }}}}.",
            "runbook": 'README.md, "When the replica\'s slot is lost": pg_basebackup -c fast -X stream -S <slot> -R through the'
            " lost slot (create a missing one first)",
        },
    }
