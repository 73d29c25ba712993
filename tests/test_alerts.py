"""Alerts announced and delivered through Airflow: the ``opsync_alerts`` DAG and the drain task's failure callback.

Announcing keeps its state in the real Redis; delivery runs the real DAGs with ``dag.test()`` against
the real Redis and databases, and posts to a real local webhook receiver (an ``http.server`` in a
thread). The rules themselves, judged on constructed measurements: tests/unit/test_alerts.py.
"""

from tests.airflow_home import configure_airflow, migrate

AIRFLOW_HOME = configure_airflow()

import asyncore  # noqa: E402
import email  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import secrets  # noqa: E402
import smtpd  # noqa: E402  (3.11 still has it: a real SMTP server for the test)
import threading  # noqa: E402
import uuid  # noqa: E402
from dataclasses import replace  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402
from airflow.dag_processing.dagbag import DagBag  # noqa: E402

from devstack.settings import REPO  # noqa: E402
from opsync import dlq, drain  # noqa: E402
from opsync.buffer import Buffer  # noqa: E402
from opsync.buffer.figures import BufferStats  # noqa: E402
from opsync.monitoring.alerts import FIGURES, Change, Thresholds, announce, due, evaluate, stored_findings, summary  # noqa: E402
from opsync.monitoring.drain_metrics import DrainMetrics, drain_metrics, record_run  # noqa: E402
from opsync.read_model.store import ReadModel  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.measurements import CAUGHT_UP, HEALTHY  # noqa: E402
from tests.measurements import site_status as status  # noqa: E402
from tests.test_browser import CHROMIUM, console_errors, element, labels, render  # noqa: E402
from tests.test_datasette_views import SITE_TZ, datasette_site  # noqa: E402
from tests.test_drain import buffered, engine, observation  # noqa: E402


def test_a_poison_row_is_announced_once_and_resolved_once_published(redis_server):
    buffer = Buffer(redis_server.client(), prefix=f"alerts-{uuid.uuid4().hex[:8]}")
    sent: list[list[Change]] = []

    def announce_now(rows: int) -> list[Change]:
        return announce(
            buffer, evaluate(status(read_model=replace(CAUGHT_UP, poison_rows=rows)), DrainMetrics(), Thresholds()), sent.append
        )

    assert [(c.finding.figure, c.finding.level) for c in announce_now(1)] == [("poison_rows", "warn")]
    assert announce_now(3) == [] and len(sent) == 1  # more rows, the same level: silence
    assert [c.resolved for c in announce_now(0)] == [True]


def test_only_changes_are_announced_and_a_cleared_problem_is_resolved(redis_server):
    buffer = Buffer(redis_server.client(), prefix=f"alerts-{uuid.uuid4().hex[:8]}")
    sent: list[list[Change]] = []
    dead = replace(HEALTHY, dead_letters=2)

    def announce_now(stats: BufferStats, failed_runs: int = 0) -> list[Change]:
        return announce(buffer, evaluate(status(stats), DrainMetrics(failed_runs_consecutive=failed_runs), Thresholds()), sent.append)

    assert announce_now(HEALTHY) == [] and sent == []  # never announced counts as ok
    first = announce_now(dead)
    assert [(c.finding.figure, c.previous, c.finding.level) for c in first] == [("dead_letters", "ok", "critical")]
    assert announce_now(dead) == [] and len(sent) == 1  # the same problem a minute later: silence
    assert [c.finding.figure for c in announce_now(dead, failed_runs=3)] == ["drain_failed_runs"]
    escalated = announce_now(dead, failed_runs=10)
    assert [(c.previous, c.finding.level) for c in escalated] == [("warn", "critical")]
    cleared = announce_now(HEALTHY)
    assert {c.finding.figure for c in cleared} == {"dead_letters", "drain_failed_runs"} and all(c.resolved for c in cleared)
    assert summary("obs", cleared).splitlines()[0] == "opsync obs: resolved"
    assert announce_now(HEALTHY) == [] and len(sent) == 4


def test_a_failed_delivery_is_retried_at_the_next_evaluation(redis_server):
    buffer = Buffer(redis_server.client(), prefix=f"alerts-{uuid.uuid4().hex[:8]}")
    findings = evaluate(status(replace(HEALTHY, dead_letters=1)), DrainMetrics(), Thresholds())

    def unreachable(changes):
        raise ConnectionError("webhook down")

    with pytest.raises(ConnectionError):
        announce(buffer, findings, unreachable)
    assert [c.finding.figure for c in due(buffer, findings)] == ["dead_letters"]


# --- delivery through Airflow ---------------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """A local webhook: keeps every JSON body posted to its secret path; answers ``status``."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.status = 200
        self.path_secret = f"/hooks/{secrets.token_hex(16)}"
        super().__init__(("127.0.0.1", free_port()), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{self.path_secret}"

    @property
    def apprise_url(self) -> str:
        """The same endpoint as Apprise's JSON service: it POSTs ``{"title", "message", "type", ...}``."""
        return f"json://127.0.0.1:{self.server_address[1]}{self.path_secret}"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == self.server.path_secret and self.server.status == 200:
            self.server.bodies.append(body)
        self.send_response(self.server.status if self.path == self.server.path_secret else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=REPO / "dags", safe_mode=False)


@pytest.fixture
def site(migrated, own_redis, receiver, monkeypatch):
    """Airflow's connections point at this test's Redis and databases; alerts go to the receiver."""
    migrate()
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", own_redis.url)
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_PRIMARY", migrated.primary.url(driver="postgresql"))
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_REPLICA", migrated.replica.url(driver="postgresql"))
    monkeypatch.setenv("OPSYNC_ALERT_WEBHOOK_URL", receiver.url)
    for level in ("WARN", "CRITICAL"):  # an idle test replica may be seconds behind a checkpoint: not these tests' concern
        monkeypatch.setenv(f"OPSYNC_ALERT_LAG_{level}_S", "none")
    return Buffer(own_redis.client())


def run_alerts(dagbag) -> str:
    run = dagbag.get_dag("opsync_alerts").test()
    return run.state


def test_the_alerts_dag_announces_a_dead_letter_once_then_its_resolution(site, receiver, migrated, planning, dagbag, capsys):
    primary = engine(migrated.primary.url())
    try:
        poison = buffered(site, observation(planning, obs_unit_id=str(uuid.uuid4())))
        assert drain.drain(site, primary).dead_lettered == 1
    finally:
        primary.dispose()

    assert run_alerts(dagbag) == "success"
    (alert,) = receiver.bodies
    assert alert["text"].startswith("opsync observatory: CRITICAL")
    assert [(c["figure"], c["level"], c["previous"], c["value"]) for c in alert["changes"]] == [("dead_letters", "critical", "ok", 1)]
    at, findings = stored_findings(site)  # what the Datasette dashboard shows
    assert at and {f.figure: f.level for f in findings}["dead_letters"] == "critical" and len(findings) == len(FIGURES)

    assert run_alerts(dagbag) == "success"
    assert len(receiver.bodies) == 1  # a minute later, nothing new: nothing sent

    dlq.discard(site, str(poison.txn_id), by="test")
    assert run_alerts(dagbag) == "success"
    resolved = receiver.bodies[-1]
    assert resolved["text"].startswith("opsync observatory: resolved")
    assert [(c["figure"], c["resolved"]) for c in resolved["changes"]] == [("dead_letters", True)]
    assert receiver.path_secret not in capsys.readouterr().out  # the URL may hold a secret: never logged


def test_a_webhook_that_fails_fails_the_task_and_the_alert_comes_at_the_next_run(site, receiver, dagbag, monkeypatch, capsys):
    record_run(site, ok=False, error_class="transient")
    monkeypatch.setenv("OPSYNC_ALERT_DRAIN_FAILED_RUNS_WARN", "1")
    site.note("drain", drain.now())  # a new site has never drained: not this test's concern
    receiver.status = 503

    assert run_alerts(dagbag) == "failed"
    log = capsys.readouterr().out
    assert "alert webhook answered HTTP 503" in log and receiver.path_secret not in log

    receiver.status = 200
    assert run_alerts(dagbag) == "success"
    assert [c["figure"] for c in receiver.bodies[0]["changes"]] == ["drain_failed_runs"]


def test_a_slack_webhook_connection_gets_text(site, receiver, dagbag, monkeypatch):
    monkeypatch.delenv("OPSYNC_ALERT_WEBHOOK_URL")
    monkeypatch.setenv(
        "AIRFLOW_CONN_OPSYNC_ALERT_WEBHOOK", json.dumps({"conn_type": "http", "extra": {"url": receiver.url, "format": "slack"}})
    )
    site.client.xadd(site.dead_letters, {"txn": "", "txn_id": "", "reason": "test", "stream_id": "0-1", "failed_at": "now"})
    site.note("drain", drain.now())

    assert run_alerts(dagbag) == "success"
    assert receiver.bodies == [{"text": "opsync observatory: CRITICAL\nCRITICAL dead_letters: dead letters: 1 (critical at 1)"}]


def dead_letter(buffer: Buffer) -> None:
    buffer.client.xadd(buffer.dead_letters, {"txn": "", "txn_id": "", "reason": "test", "stream_id": "0-1", "failed_at": "now"})


DEAD_LETTER_ALERT = "opsync observatory: CRITICAL\nCRITICAL dead_letters: dead letters: 1 (critical at 1)"


def test_an_apprise_url_gets_the_alert_text_once_per_change_and_never_logs_its_secret(site, receiver, dagbag, monkeypatch, capsys, caplog):
    """Through Apprise alone (``OPSYNC_ALERT_APPRISE_URL``): the text the other channels get, its first line
    the title; nothing again while unchanged; the resolution. Apprise and urllib3 would log the URL at DEBUG."""
    monkeypatch.delenv("OPSYNC_ALERT_WEBHOOK_URL")
    monkeypatch.setenv("OPSYNC_ALERT_APPRISE_URL", receiver.apprise_url)
    for name in ("apprise", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    dead_letter(site)
    site.note("drain", drain.now())

    assert run_alerts(dagbag) == "success"
    (alert,) = receiver.bodies
    assert (alert["title"], alert["message"], alert["type"]) == ("opsync observatory: CRITICAL", DEAD_LETTER_ALERT, "failure")
    assert run_alerts(dagbag) == "success"
    assert len(receiver.bodies) == 1  # unchanged: nothing sent

    site.client.delete(site.dead_letters)
    assert run_alerts(dagbag) == "success"
    resolved = receiver.bodies[-1]
    assert (resolved["title"], resolved["type"]) == ("opsync observatory: resolved", "success") and len(receiver.bodies) == 2
    assert resolved["message"] == "opsync observatory: resolved\nRESOLVED dead_letters: dead letters: 0"
    logged = capsys.readouterr().out + caplog.text
    assert "Sent JSON POST notification" in logged  # Apprise's log is kept, at INFO
    assert receiver.path_secret not in logged


def test_an_apprise_connection_that_fails_fails_the_task_and_the_alert_comes_at_the_next_run(site, receiver, dagbag, monkeypatch, capsys):
    """The provider's connection (type ``apprise``) wins over the variable; Apprise's failure is the task's."""
    monkeypatch.delenv("OPSYNC_ALERT_WEBHOOK_URL")
    monkeypatch.setenv("OPSYNC_ALERT_APPRISE_URL", "json://127.0.0.1:9/nowhere")  # the connection wins
    connection = {"conn_type": "apprise", "extra": {"config": {"path": receiver.apprise_url}}}
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_ALERT_APPRISE", json.dumps(connection))
    dead_letter(site)
    site.note("drain", drain.now())
    receiver.status = 503

    assert run_alerts(dagbag) == "failed"
    log = capsys.readouterr().out
    assert "Apprise delivery failure: 1 of 1 services failed" in log and receiver.path_secret not in log

    receiver.status = 200
    assert run_alerts(dagbag) == "success"
    assert [body["message"] for body in receiver.bodies] == [DEAD_LETTER_ALERT]


def test_an_apprise_url_it_cannot_use_fails_the_task_without_naming_it(site, dagbag, monkeypatch, capsys):
    monkeypatch.delenv("OPSYNC_ALERT_WEBHOOK_URL")
    monkeypatch.setenv("OPSYNC_ALERT_APPRISE_URL", "nosuchservice://s3cr3t-token@example.org")
    dead_letter(site)
    site.note("drain", drain.now())

    assert run_alerts(dagbag) == "failed"
    log = capsys.readouterr().out
    assert "is not one Apprise can use" in log and "s3cr3t-token" not in log


def test_the_drain_tasks_failure_callback_announces_n_failed_runs_in_a_row(site, receiver, migrated, planning, dagbag, monkeypatch):
    monkeypatch.setenv("OPSYNC_ALERT_DRAIN_FAILED_RUNS_WARN", "2")
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_PRIMARY", f"postgresql://opsync@127.0.0.1:{free_port()}/opsync")  # nothing listens
    buffered(site, observation(planning))
    dag = dagbag.get_dag("opsync_drain")
    monkeypatch.setattr(dag.get_task("drain"), "retries", 0)  # dag.test() would sit out the backoff

    assert dag.test().state == "failed"
    assert drain_metrics(site.client, site).failed_runs_consecutive == 1 and receiver.bodies == []
    assert dag.test().state == "failed"

    (alert,) = receiver.bodies
    assert [(c["figure"], c["level"], c["value"]) for c in alert["changes"]] == [("drain_failed_runs", "warn", 2)]
    assert dag.test().state == "failed"
    assert len(receiver.bodies) == 1  # the third failure is still "warn": not announced again

    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_PRIMARY", migrated.primary.url(driver="postgresql"))
    assert dag.test().state == "success"
    assert run_alerts(dagbag) == "success"
    assert [(c["figure"], c["resolved"]) for c in receiver.bodies[-1]["changes"]] == [("drain_failed_runs", True)]


class MailReceiver(smtpd.SMTPServer):
    """A local SMTP server keeping every message it is given."""

    def __init__(self):
        self.messages: list[tuple[str, list[str], str]] = []
        super().__init__(("127.0.0.1", free_port()), None, decode_data=True)

    def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):
        self.messages.append((mailfrom, rcpttos, data))


@pytest.fixture
def mailbox():
    server = MailReceiver()
    thread = threading.Thread(target=asyncore.loop, kwargs={"timeout": 0.1}, daemon=True)
    thread.start()
    yield server
    server.close()
    thread.join(5)


def test_alerts_are_mailed_through_airflows_smtp_connection(site, mailbox, dagbag, monkeypatch):
    monkeypatch.delenv("OPSYNC_ALERT_WEBHOOK_URL")
    monkeypatch.setenv("OPSYNC_ALERT_EMAIL_TO", '["ops@example.org"]')
    monkeypatch.setenv(
        "AIRFLOW_CONN_SMTP_DEFAULT",
        json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": mailbox.socket.getsockname()[1],
                "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "opsync@example.org"},
            }
        ),
    )
    site.client.xadd(site.dead_letters, {"txn": "", "txn_id": "", "reason": "test", "stream_id": "0-1", "failed_at": "now"})
    site.note("drain", drain.now())

    assert run_alerts(dagbag) == "success"
    ((sender, recipients, message),) = mailbox.messages
    assert (sender, recipients) == ("opsync@example.org", ["ops@example.org"])
    mail = email.message_from_string(message)
    assert mail["Subject"] == "opsync observatory: CRITICAL"
    (html,) = [part.get_payload(decode=True).decode() for part in mail.walk() if part.get_content_type() == "text/html"]
    assert html == "<pre>opsync observatory: CRITICAL\nCRITICAL dead_letters: dead letters: 1 (critical at 1)</pre>"


# --- the Datasette dashboard ----------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/bootstrap.sh installs it)")
def test_the_sync_dashboard_shows_the_findings_and_the_drain_rate(tmp_path):
    minute = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:00Z")
    findings = [
        ("depth", 0, "ok", "buffered transactions: 0", "2026-11-21T03:00:00+00:00"),
        ("dead_letters", 1, "critical", "dead letters: 1 <b>(critical at 1)</b>", "2026-11-21T03:00:00+00:00"),
    ]
    with datasette_site(tmp_path) as (base, _, path):
        empty = render(f"{base}/-/dashboards/sync", "dashboard-no-findings", tmp_path)
        model = ReadModel(path, SITE_TZ)
        try:
            model.store_drain([(minute, 12)], findings, keep_days=30)
        finally:
            model.close()
        rendered = render(f"{base}/-/dashboards/sync", "dashboard-findings", tmp_path)

    assert "not evaluated yet" in element(empty.dom, "chart-alerts") and not console_errors(empty)
    assert not console_errors(rendered), console_errors(rendered)
    alerts = element(rendered.dom, "chart-alerts")
    assert "<td>CRITICAL</td><td>dead_letters</td><td>dead letters: 1 &lt;b&gt;(critical at 1)&lt;/b&gt;</td>" in alerts  # escaped
    assert alerts.index("CRITICAL") < alerts.index("<td>OK</td><td>depth</td>")  # the worst first
    rate = labels(element(rendered.dom, "chart-drain-rate"))
    assert any("Records applied: 12" in label for label in rate), rate
