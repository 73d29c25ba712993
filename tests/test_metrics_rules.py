"""The Prometheus rules and the Grafana dashboard against what they mirror: ``opsync.monitoring.alerts`` judging the same
measurements (through a real ``promtool test rules``), and a live ``/metrics`` of the real API (through
``promtool check metrics``), so neither side can drift from the other.
"""

import json
import math
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from ingest_api import deps, reads
from opsync import drain
from opsync.buffer import Buffer
from opsync.config import get_settings
from opsync.monitoring import alert_rules
from opsync.monitoring.alerts import Level, Thresholds, evaluate, rules
from opsync.monitoring.drain_metrics import DrainMetrics
from opsync.monitoring.status import SiteStatus
from opsync.read_model.figures import ReadModelFigures
from tests.conftest import free_port, wait_for
from tests.measurements import CAUGHT_UP, GIB, HEALTHY, STREAMING
from tests.measurements import site_status as site
from tests.test_drain import buffered, confirm_all, observation

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy/prometheus/opsync-rules.yml"
RULE_TESTS = REPO / "deploy/prometheus/opsync-rules.test.yml"
DASHBOARD = REPO / "deploy/grafana/opsync-dashboard.json"
PROMTOOL = shutil.which("promtool")

NOW = 300  # promtool's time() at the evaluation below (5m)


def exported(s: SiteStatus, m: DrainMetrics) -> dict[str, float]:
    """What ``/metrics`` shows of this measurement (as ingest_api.metrics exports it), at promtool's ``NOW``."""
    series: dict[str, float] = {"up": 1, "opsync_buffer_up": int(s.buffer is not None)}
    if b := s.buffer:
        series |= {
            "opsync_buffer_depth": b.depth,
            "opsync_committed_not_replicated": b.awaiting_replica,
            "opsync_dead_letters": b.dead_letters,
            "opsync_drain_runs_failed_consecutive": m.failed_runs_consecutive,
        }
        for name, age in (
            ("opsync_buffer_oldest_enqueued_timestamp_seconds", b.oldest_age_s or None),
            ("opsync_last_drain_timestamp_seconds", b.last_drain_s),
            ("opsync_last_confirm_timestamp_seconds", b.last_confirm_s),
        ):
            if age is not None:
                series[name] = NOW - age
    rm = s.read_model
    for name, value in (
        ("opsync_read_model_poison_rows", rm.poison_rows),
        ("opsync_read_model_freshness_seconds", rm.freshness_s),
        ("opsync_replica_lag_bytes", s.lag_bytes),
        ("opsync_replica_lag_seconds", s.lag_s),
    ):
        if value is not None:
            series[name] = value
    series["opsync_replica_slot_up"] = int(s.slot is not None)
    if slot := s.slot:
        current = slot.wal_status if slot.exists else "missing"
        for state in ("reserved", "extended", "unreserved", "lost", "missing"):
            series[f'opsync_replica_slot_wal_status{{status="{state}"}}'] = int(state == current)
        if slot.safe_wal_size is not None:
            series["opsync_replica_slot_safe_wal_bytes"] = slot.safe_wal_size
        series["opsync_replica_slot_max_wal_keep_bytes"] = math.inf if slot.max_keep is None else slot.max_keep
    return series


def at(figure: str, value: float) -> tuple[SiteStatus, DrainMetrics]:
    """A healthy site but for one figure at ``value``."""
    b = {
        "buffer_oldest_age_s": dict(depth=1, oldest_age_s=value),
        "depth": dict(depth=value),
        "awaiting_replica": dict(awaiting_replica=value),
        "dead_letters": dict(dead_letters=value),
        "last_drain_s": dict(last_drain_s=value),
        "last_confirm_s": dict(last_confirm_s=value, awaiting_replica=1),
    }.get(figure, {})
    kwargs = {
        "lag_bytes": dict(lag_bytes=value),
        "lag_s": dict(lag_bytes=1, replay_age_s=value),
        "poison_rows": dict(read_model=replace(CAUGHT_UP, poison_rows=value)),
        "read_model_freshness_s": dict(read_model=replace(CAUGHT_UP, stream_age_s=value)),
    }.get(figure, {})
    return site(replace(HEALTHY, **b), **kwargs), DrainMetrics(failed_runs_consecutive=value if figure == "drain_failed_runs" else 0)


def cases(t: Thresholds) -> dict[str, tuple[SiteStatus, DrainMetrics]]:
    """Each threshold just below and at its value, the slot's every state, and each way of not knowing."""
    found = {}
    for figure, rule in rules(t).items():
        for threshold in (rule.warn, rule.critical):
            if threshold is not None:
                exact = threshold / rule.scale
                found[f"{figure}-below-{exact:g}"] = at(figure, exact - 0.5)
                found[f"{figure}-at-{exact:g}"] = at(figure, exact)
    found["last_confirm_s-old-nothing-awaits"] = site(replace(HEALTHY, last_confirm_s=10**6)), DrainMetrics()
    for fraction in (0.51, 0.5, 0.21, 0.2, 0.0):
        found[f"slot-{fraction}"] = site(slot=replace(STREAMING, safe_wal_size=int(fraction * 10 * GIB))), DrainMetrics()
    for name, slot in {
        "slot-unreserved": replace(STREAMING, wal_status="unreserved", safe_wal_size=-GIB),
        "slot-lost": replace(STREAMING, wal_status="lost", safe_wal_size=None),
        "slot-missing": replace(STREAMING, exists=False, wal_status=None, safe_wal_size=None),
        "slot-no-limit": replace(STREAMING, safe_wal_size=None, max_keep=None),
        "slot-reserves-nothing-yet": replace(STREAMING, wal_status=None, safe_wal_size=None),
    }.items():
        found[name] = site(slot=slot), DrainMetrics()
    found |= {
        "redis-down": (site(buffer=None, redis="Connection refused"), DrainMetrics()),
        "primary-down": (site(slot=None, primary="timeout expired"), DrainMetrics()),
        "replica-down": (site(replica="connection refused"), DrainMetrics()),
        "never-drained": (site(replace(HEALTHY, last_drain_s=None)), DrainMetrics()),
        "never-confirmed-while-awaiting": (site(replace(HEALTHY, awaiting_replica=3, last_confirm_s=None)), DrainMetrics()),
        "read-model-unknown": (site(read_model=ReadModelFigures(poison_rows=0, poison_skipped=0)), DrainMetrics()),
    }
    return found


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is missing: make bootstrap installs it (Debian's prometheus package)"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120)


# --- the rules file ---------------------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.mark.parametrize(
    "changed",
    [
        {},
        {
            "depth_warn": 5,
            "dead_letters_warn": 1,
            "dead_letters_critical": None,
            "lag_warn_s": 0.5,
            "slot_safe_wal_critical_fraction": None,
        },
    ],
    ids=["defaults", "changed"],
)
def test_the_rules_fire_exactly_where_opsync_alerts_judges_warn_or_critical(changed, tmp_path):
    """promtool evaluates every rule on the series each measurement exports; opsync.monitoring.alerts judges the measurement."""
    t = Thresholds(_env_file=None, **changed)
    document = alert_rules.document(t) if changed else yaml.safe_load(RULES.read_text())
    for rule in document["groups"][0]["rules"]:
        rule.pop("annotations")  # promtool would compare them; test_promtool_accepts_... renders some
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(document))
    severity = {Level.warn: "warning", Level.critical: "critical"}
    fired: dict[str, list[dict]] = {rule["alert"]: [] for rule in document["groups"][0]["rules"]}
    inputs = []
    for case, (status, metrics) in cases(t).items():
        for series, value in exported(status, metrics).items():
            labels = f'job="opsync",instance="{case}"'
            series = series.replace("{", "{" + labels + ",") if "{" in series else f"{series}{{{labels}}}"
            inputs.append({"series": series, "values": f"{value!r}+0x10".replace("inf", "Inf")})
        for finding in evaluate(status, metrics, t):
            if finding.level is Level.ok:
                continue
            unknown = finding.value is None and finding.level is Level.warn
            labels = {"severity": severity[finding.level], "figure": finding.figure, "job": "opsync", "instance": case}
            if (
                finding.figure == "replica_slot"
                and finding.level is Level.critical
                and (status.slot.wal_status in ("unreserved", "lost") or not status.slot.exists)
            ):
                labels["status"] = status.slot.wal_status if status.slot.exists else "missing"
            fired[alert_rules.name(finding.figure, "Unknown" if unknown else severity[finding.level].capitalize())].append(
                {"exp_labels": labels}
            )
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": inputs,
                        "alert_rule_test": [
                            {"eval_time": "5m", "alertname": name, "exp_alerts": expected} for name, expected in fired.items()
                        ],
                    }
                ],
            }
        )
    )

    tested = promtool("test", "rules", str(tmp_path / "test.yml"))

    assert tested.returncode == 0, tested.stdout[-6000:] + tested.stderr
    assert sum(map(len, fired.values())) >= 40  # the cases do cross the thresholds


# --- /metrics, live ---------------------------------------------------------------------------------------------------


def scraped(text: str) -> dict[str, float]:
    return {
        s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_metrics_show_the_replicas_lag_as_opsync_status_measures_it_and_leave_out_what_is_unknown(
    api_client, migrated, primary_engine, planning, monkeypatch
):
    def write() -> None:
        with primary_engine.begin() as conn:
            conn.execute(text("INSERT INTO instrument (id, name) VALUES (:i, :n)"), {"i": uuid.uuid4(), "n": f"lag-{uuid.uuid4()}"})

    caught_up = wait_for(
        lambda: (g := scraped(api_client.get("/metrics").text)).get("opsync_replica_lag_bytes") == 0 and g, what="the replica to catch up"
    )
    assert caught_up["opsync_replica_lag_seconds"] == 0

    with migrated.replica.connect(autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            write()
            time.sleep(0.2)
            paused = scraped(api_client.get("/metrics").text)
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
    assert paused["opsync_replica_lag_bytes"] > 0 and paused["opsync_replica_lag_seconds"] > 0
    wait_for(lambda: scraped(api_client.get("/metrics").text).get("opsync_replica_lag_bytes") == 0, what="replay to resume")

    dead = f"postgresql+psycopg://opsync:x@127.0.0.1:{free_port()}/opsync"

    def cut(variable: str) -> dict[str, float]:
        monkeypatch.setenv(variable, dead)
        for cached in (get_settings, reads.get_replica, deps.get_primary):
            cached.cache_clear()
        return scraped(api_client.get("/metrics").text)

    try:
        write()
        replica_down = cut("OPSYNC_REPLICA_URL")
        both_down = cut("OPSYNC_PRIMARY_URL")
    finally:
        monkeypatch.undo()
        for cached in (get_settings, reads.get_replica, deps.get_primary):
            cached.cache_clear()
    # from the position the slot confirmed (the replica still streams: only the API's way to it is cut); no replay
    # time without the replica, so seconds are known only as 0 when nothing is behind: else absent, never -1
    assert replica_down["opsync_replica_lag_bytes"] >= 0
    assert replica_down.get("opsync_replica_lag_seconds", "absent") == (0 if replica_down["opsync_replica_lag_bytes"] == 0 else "absent")
    assert not any(k.startswith("opsync_replica_lag") for k in both_down) and both_down["opsync_replica_slot_up"] == 0


@pytest.fixture
def full_scrape(own_redis, live_api, primary_engine, replica_engine, planning, monkeypatch):
    """A live /metrics over HTTP where every figure is known: a transaction drained and confirmed, one still
    buffered, a write answered, two capacity readings."""
    import httpx

    monkeypatch.setenv("OPSYNC_CAPACITY_WINDOW_S", "3")
    get_settings.cache_clear()
    buffer = Buffer(own_redis.client())  # the API's buffer: the default prefix
    buffered(buffer, observation(planning))
    drain.drain(buffer, primary_engine)
    confirm_all(buffer, replica_engine)
    buffered(buffer, observation(planning))
    with httpx.Client(base_url=live_api, timeout=30) as client:
        assert client.post("/v1/transactions", json={}).status_code == 401
        client.get("/metrics")
        time.sleep(0.2)
        return client.get("/metrics").text


def queried(expressions) -> set[str]:
    return {name for e in expressions for name in re.findall(r"\b(?:opsync_\w+|up)\b(?=\s*[{\[)\s]|$)", e)}


def test_promtool_finds_nothing_to_fault_in_a_live_metrics_scrape(full_scrape):
    checked = promtool("check", "metrics", stdin=full_scrape)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked.stdout + checked.stderr


def test_every_metric_the_rules_and_the_dashboard_query_is_on_a_live_metrics(full_scrape):
    names = {s.name for f in text_string_to_metric_families(full_scrape) for s in f.samples}
    rule_exprs = [r["expr"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    dashboard_exprs = [t["expr"] for p in panels for t in p["targets"]]
    for source, expressions in (("rules", rule_exprs), ("dashboard", dashboard_exprs)):
        missing = queried(expressions) - names - {"up"}  # up: Prometheus' own, per scrape target
        assert not missing, f"the {source} query what /metrics does not export: {sorted(missing)}"
    assert queried(rule_exprs) - {"up"} <= queried(dashboard_exprs), "a figure the rules judge has no panel"
    assert {"opsync_http_requests_total", "opsync_http_request_duration_seconds_bucket"} <= queried(dashboard_exprs)
    assert {"opsync_replica_lag_bytes", "opsync_replica_slot_wal_status", "opsync_last_confirm_timestamp_seconds", "up"} <= queried(
        rule_exprs
    )  # the names are found
