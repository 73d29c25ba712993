"""The Prometheus rules and the Grafana dashboard as ``opsync.monitoring.alert_rules`` and ``opsync.monitoring.alerts`` make them: the
checked-in rules are what ``opsync alert-rules`` prints, every figure and level has its rule, the dashboard colours
each figure at its thresholds. That the rules fire where ``opsync.monitoring.alerts`` judges (promtool) and a live
``/metrics``: tests/test_metrics_rules.py."""

import json
import os
import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from opsync.cli import main
from opsync.monitoring.alerts import FIGURES, Thresholds, rules

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/opsync-rules.yml"
DASHBOARD = REPO / "deploy/grafana/opsync-dashboard.json"


def alert_names() -> list[str]:
    return [r["alert"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]


def test_the_checked_in_rules_are_what_opsync_alert_rules_prints_at_the_default_thresholds(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env
    for variable in [v for v in os.environ if v.startswith("OPSYNC_ALERT_")]:
        monkeypatch.delenv(variable)
    printed = CliRunner().invoke(main, ["alert-rules"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == RULES.read_text(), "regenerate: opsync alert-rules > deploy/prometheus/opsync-rules.yml"

    monkeypatch.setenv("OPSYNC_ALERT_DEPTH_WARN", "5")
    monkeypatch.setenv("OPSYNC_ALERT_DEAD_LETTERS_CRITICAL", "none")
    changed = yaml.safe_load(CliRunner().invoke(main, ["alert-rules", "--job", "site-api"]).output)["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in changed}
    assert by_name["OpsyncDepthWarning"]["expr"] == "opsync_buffer_depth >= 5 < 1000000"
    assert "OpsyncDeadLettersCritical" not in by_name and "OpsyncDeadLettersUnknown" in by_name  # unknown still warns
    assert by_name["OpsyncMetricsDown"]["expr"] == 'up{job="site-api"} == 0'


def test_every_figure_and_level_of_opsync_alerts_has_its_rule_and_nothing_else_does():
    found = {
        (r["labels"]["figure"], r["labels"]["severity"], r["alert"].endswith("Unknown"))
        for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    }
    t = Thresholds(_env_file=None)
    want = {(figure, "warning", True) for figure in FIGURES} | {("scrape", "warning", False)}
    for figure, rule in rules(t).items():
        want |= {
            (figure, severity, False)
            for severity, threshold in (("warning", rule.warn), ("critical", rule.critical))
            if threshold is not None
        }
    want |= {("replica_slot", "warning", False), ("replica_slot", "critical", False)}
    assert found == want
    assert len(alert_names()) == len(set(alert_names()))


def test_the_dashboard_colours_each_figure_at_its_default_thresholds_and_takes_its_data_source_as_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    shown = {}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        if m := re.match(r"figure (\w+)", panel["description"]):
            shown.setdefault(m[1], panel)
    assert set(shown) == set(FIGURES)
    for figure, rule in rules(Thresholds(_env_file=None)).items():
        steps = [s["value"] for s in shown[figure]["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]]
        assert steps == [t / rule.scale for t in (rule.warn, rule.critical) if t is not None], figure
    assert {v["name"]: v["type"] for v in dashboard["templating"]["list"]} == {"datasource": "datasource", "instance": "query"}
