"""``opsync.monitoring.alerts`` judging constructed measurements (tests/measurements.py): every threshold at its value, what
cannot be measured, the slot, the read model, and the payloads sent. Delivery through Airflow: tests/test_alerts.py."""

from dataclasses import replace

import pytest
from pydantic import ValidationError

from opsync.monitoring.alerts import FIGURES, Change, Finding, Level, Thresholds, evaluate, payload
from opsync.monitoring.drain_metrics import DrainMetrics
from opsync.monitoring.status import SiteStatus
from opsync.read_model.figures import Poison
from tests.measurements import CAUGHT_UP, GIB, HEALTHY, STREAMING
from tests.measurements import site_status as status


def judged(s: SiteStatus, metrics: DrainMetrics | None = None, **thresholds) -> dict[str, Finding]:
    findings = evaluate(s, metrics or DrainMetrics(), Thresholds(**thresholds))
    assert [f.figure for f in findings] == list(FIGURES)
    return {f.figure: f for f in findings}


def levels(findings: dict[str, Finding]) -> dict[str, str]:
    return {figure: f.level for figure, f in findings.items() if f.level != Level.ok}


def test_a_healthy_site_is_all_ok():
    assert levels(judged(status())) == {}
    never_confirmed = judged(status(replace(HEALTHY, last_confirm_s=None)))
    assert levels(never_confirmed) == {} and never_confirmed["last_confirm_s"].message.endswith("(nothing waits for it)")


def test_thresholds_are_reached_at_their_value_and_minutes_are_minutes():
    stats = replace(HEALTHY, oldest_age_s=15 * 60, depth=99_999, dead_letters=1)
    findings = judged(status(stats), DrainMetrics(failed_runs_consecutive=10))

    assert levels(findings) == {"buffer_oldest_age_s": "warn", "dead_letters": "critical", "drain_failed_runs": "critical"}
    assert findings["buffer_oldest_age_s"].message == "oldest buffered transaction: 15 min (warn at 15 min)"
    assert findings["buffer_oldest_age_s"].value == 900
    assert findings["dead_letters"].message == "dead letters: 1 (critical at 1)"
    assert levels(judged(status(stats), DrainMetrics(failed_runs_consecutive=9)))["drain_failed_runs"] == "warn"
    assert levels(judged(status(stats), DrainMetrics(failed_runs_consecutive=2))).get("drain_failed_runs") is None


def test_a_level_set_to_none_is_off_and_any_level_is_configurable_from_the_environment(monkeypatch):
    stats = replace(HEALTHY, dead_letters=3)
    assert "dead_letters" not in levels(judged(status(stats), dead_letters_critical=None))
    assert levels(judged(status(stats), dead_letters_warn=1, dead_letters_critical=5))["dead_letters"] == "warn"

    monkeypatch.setenv("OPSYNC_ALERT_LAG_WARN_S", "0.5")
    monkeypatch.setenv("OPSYNC_ALERT_LAG_BYTES_CRITICAL", "1000")
    findings = {f.figure: f for f in evaluate(status(lag_bytes=4096, replay_age_s=2.0), DrainMetrics(), Thresholds())}
    assert (findings["lag_s"].level, findings["lag_bytes"].level) == ("warn", "critical")
    assert findings["lag_bytes"].message == "replica lag: 4,096 bytes (critical at 1,000 bytes)"

    monkeypatch.setenv("OPSYNC_ALERT_DEAD_LETTERS_CRITICAL", "none")
    assert Thresholds().dead_letters_critical is None
    monkeypatch.setenv("OPSYNC_ALERT_DEPTH_WARN", "lots")
    with pytest.raises(ValidationError, match="depth_warn"):
        Thresholds()


def test_what_cannot_be_measured_warns_and_says_why():
    findings = judged(status(buffer=None, redis="Connection refused"))
    assert {figure for figure, level in levels(findings).items() if level == "warn"} == {
        "buffer_oldest_age_s",
        "depth",
        "awaiting_replica",
        "dead_letters",
        "drain_failed_runs",
        "last_drain_s",
        "last_confirm_s",
        "poison_rows",
        "read_model_freshness_s",
    }
    assert findings["depth"].value is None
    assert findings["depth"].message == "site buffer (Redis) unavailable: Connection refused"

    cut = judged(status(primary="timeout expired", replica="connection refused"))
    assert levels(cut) == {"lag_bytes": "warn", "lag_s": "warn", "replica_slot": "warn"}  # the slot is read on the primary
    assert cut["lag_bytes"].message == "replica lag unknown (primary: timeout expired; replica: connection refused)"
    assert cut["replica_slot"].message == "replica slot unknown (primary: timeout expired)"
    assert "replica_slot" not in levels(judged(status(replica="connection refused"))), "the slot needs the primary only"

    never = replace(HEALTHY, last_drain_s=None)
    assert judged(status(never))["last_drain_s"].message == "no drain run has finished yet"


def test_the_slot_warns_and_is_critical_by_its_wal_reserve_and_lost_or_missing_is_critical(monkeypatch):
    def slot(**fields) -> Finding:
        return judged(status(slot=replace(STREAMING, **fields)))["replica_slot"]

    assert slot(safe_wal_size=int(0.51 * 10 * GIB)).level == "ok"
    half = slot(wal_status="extended", safe_wal_size=5 * GIB)
    assert (half.level, half.value) == ("warn", 5 * GIB)
    assert half.message == (
        "replica slot observatory: extended, 5,368,709,120 bytes of WAL (50% of max_slot_wal_keep_size) before it is dropped (warn at 50%)"
    )
    assert slot(safe_wal_size=2 * GIB).level == "critical"
    assert slot(safe_wal_size=0).level == "critical"
    past = slot(wal_status="unreserved", safe_wal_size=-4096, active=False)
    assert past.level == "critical" and "lost at the next checkpoint" in past.message
    lost = slot(wal_status="lost", safe_wal_size=None, restart_lsn=None, active=False)
    assert lost.level == "critical" and "clone the replica again" in lost.message
    missing = slot(exists=False, wal_status=None, safe_wal_size=None, active=False, restart_lsn=None)
    assert missing.level == "critical" and "does not exist" in missing.message
    unlimited = slot(safe_wal_size=None, max_keep=None)
    assert unlimited.level == "ok" and "without limit" in unlimited.message

    monkeypatch.setenv("OPSYNC_ALERT_SLOT_SAFE_WAL_WARN_FRACTION", "none")
    monkeypatch.setenv("OPSYNC_ALERT_SLOT_SAFE_WAL_CRITICAL_FRACTION", "0.05")
    assert (slot(safe_wal_size=2 * GIB).level, slot(safe_wal_size=GIB // 2).level) == ("ok", "critical")


def test_confirmation_age_counts_only_while_transactions_await_the_replica():
    waiting = replace(HEALTHY, awaiting_replica=3, last_confirm_s=4000.0)
    assert levels(judged(status(waiting))) == {"last_confirm_s": "critical"}
    idle = replace(HEALTHY, last_confirm_s=4000.0)
    assert levels(judged(status(idle))) == {}
    unconfirmed = replace(HEALTHY, awaiting_replica=3, last_confirm_s=None)
    assert levels(judged(status(unconfirmed))) == {"last_confirm_s": "warn"}


def test_poison_rows_warn_from_the_first_and_name_the_latest():
    latest = Poison(
        "executed_obs_unit",
        "0190c0de-0000-7000-8000-000000000001",
        "replica changes",
        "RecursionError: maximum recursion depth exceeded",
        "2026-11-21T03:00:00+00:00",
    )
    findings = judged(status(read_model=replace(CAUGHT_UP, poison_rows=2, poison_skipped=5, recent=[latest])))

    assert levels(findings) == {"poison_rows": "warn"}
    assert findings["poison_rows"].value == 2
    assert findings["poison_rows"].message == (
        "rows the read model skips: 2 (warn at 1); latest: executed_obs_unit 0190c0de-0000-7000-8000-000000000001"
        " (replica changes: RecursionError: maximum recursion depth exceeded)"
    )
    assert levels(judged(status(read_model=replace(CAUGHT_UP, poison_skipped=5)))) == {}, "skipped once, published since"
    assert levels(judged(status(read_model=replace(CAUGHT_UP, poison_rows=2)), poison_rows_critical=2)) == {"poison_rows": "critical"}


def test_read_model_freshness_warns_and_is_critical_at_its_thresholds_and_unknown_says_why():
    def behind(stream: float | None, changes: float | None, **unavailable) -> Finding:
        read_model = replace(CAUGHT_UP, stream_age_s=stream, changes_age_s=changes, unavailable=unavailable)
        return judged(status(read_model=read_model))["read_model_freshness_s"]

    assert (behind(119.0, 3.0).level, behind(3.0, 120.0).level, behind(900.0, 0.0).level) == ("ok", "warn", "critical")
    assert behind(0.0, 130.0).message == "read model behind by: 130 s (warn at 120 s)"
    assert behind(200.0, None, replica="connection refused").level == "warn", "one part is enough to judge"
    unknown = behind(None, None, redis="Connection refused")
    assert (unknown.level, unknown.value) == ("warn", None)
    assert unknown.message == "read model figures unknown (redis: Connection refused)"


def test_payloads_generic_and_slack():
    finding = Finding("dead_letters", 2, Level.critical, "dead letters: 2 (critical at 1)")
    changes = [Change(finding, Level.ok), Change(Finding("lag_s", 0.0, Level.ok, "replica lag: 0 s"), Level.warn)]

    text = "opsync obs: CRITICAL\nCRITICAL dead_letters: dead letters: 2 (critical at 1)\nRESOLVED lag_s: replica lag: 0 s"
    assert payload("obs", changes, slack=True) == {"text": text}
    generic = payload("obs", changes)
    assert generic["text"] == text and generic["site"] == "obs"
    assert generic["changes"][0] == {
        "figure": "dead_letters",
        "value": 2,
        "level": "critical",
        "previous": "ok",
        "resolved": False,
        "message": "dead letters: 2 (critical at 1)",
    }
    assert generic["changes"][1]["resolved"] is True
