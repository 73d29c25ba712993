"""The Sync status page (``opsync_airflow.ui``) in-process, mounted by Airflow's own ``init_plugins`` as the API
server mounts it, against the real Redis, primary and replica, with real JWTs from the simple auth manager.

The figures must equal ``opsync status --json``; the auth matrix covers anonymous, malformed, forged,
expired, revoked and unsigned tokens, a user without a role, viewer, user, op and admin, and the
cookie's CSRF token; requeue applies exactly once however often it is clicked; discard is audited.
"""

from tests.airflow_home import configure_airflow, migrate

AIRFLOW_HOME = configure_airflow()

import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from html.parser import HTMLParser  # noqa: E402

import jwt  # noqa: E402
import pytest  # noqa: E402
from airflow import plugins_manager  # noqa: E402
from airflow.api_fastapi.app import init_auth_manager, init_plugins  # noqa: E402
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402

from opsync import cli, dlq, drain  # noqa: E402
from opsync.buffer import Buffer  # noqa: E402
from opsync.monitoring import drain_metrics  # noqa: E402
from opsync.read_model.figures import Poison, store_poison  # noqa: E402
from opsync_airflow.ui.access import CSRF_HEADER  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.test_dlq import fix_cause, in_ledger, poison, unsent  # noqa: E402

STATUS = "/opsync/api/status"


class Figures(HTMLParser):
    """Collects the page's figures (``data-figure``, ``data-level``, ``data-value``) and other tagged elements."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.figures: dict[str, dict[str, str]] = {}
        self.buttons: list[dict[str, str]] = []
        self.audit: list[dict[str, str]] = []
        self.bars: list[int] = []
        self.meta: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs) -> None:
        a = {k: v or "" for k, v in attrs}
        if "data-figure" in a:
            self.figures[a["data-figure"]] = {"level": a["data-level"], "value": a["data-value"]}
        elif tag == "button" and "data-action" in a:
            self.buttons.append(a)
        elif tag == "tr" and "data-by" in a:
            self.audit.append(a)
        elif tag == "rect" and "data-count" in a:
            self.bars.append(int(a["data-count"]))
        elif tag == "meta" and "name" in a:
            self.meta[a["name"]] = a.get("content", "")


@pytest.fixture(scope="module")
def auth_manager():
    migrate()  # revoked tokens are looked up in Airflow's metadata DB
    return init_auth_manager()


@pytest.fixture(scope="module")
def airflow_app(auth_manager) -> FastAPI:
    """An app with the plugin mounted by Airflow's own code, from opsync's entry point, as the API server does."""
    root = FastAPI()
    init_plugins(root)
    return root


@pytest.fixture
def site(migrated, own_redis, monkeypatch) -> Buffer:
    """Airflow's connections point at this test's Redis and the test databases, as ``make up`` sets them."""
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", own_redis.url)
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_PRIMARY", migrated.primary.url(driver="postgresql"))
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_REPLICA", migrated.replica.url(driver="postgresql"))
    return Buffer(own_redis.client())


@pytest.fixture
def client(airflow_app, site):
    with TestClient(airflow_app) as client:
        yield client


@pytest.fixture
def token(auth_manager):
    """``token(role, name=None, **jwt_options)``: a real JWT signed by the simple auth manager."""

    def issue(role: str | None, name: str | None = None, **options) -> str:
        return auth_manager.generate_jwt(SimpleAuthManagerUser(username=name or f"{role}-person", role=role), **options)

    return issue


@pytest.fixture
def primary(migrated):
    engine = create_engine(migrated.primary.url(), connect_args={"connect_timeout": 5})
    yield engine
    engine.dispose()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def page(client, token: str) -> Figures:
    client.cookies.set("_token", token)
    try:
        response = client.get("/opsync/")
    finally:
        client.cookies.clear()
    assert response.status_code == 200, response.text
    return Figures(response.text)


def cli_status() -> dict:
    result = CliRunner().invoke(cli.main, ["status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def quiet_status(client, token: str, timeout: float = 15) -> tuple[dict, dict]:
    """The page's JSON and ``opsync status --json``, taken once the replica has caught up (lag 0 in both)."""
    deadline = time.monotonic() + timeout
    while True:
        ours = client.get(STATUS, headers=bearer(token)).json()
        theirs = cli_status()
        if ours["replica"]["lag_bytes"] == theirs["replica"]["lag_bytes"] == 0:
            return ours, theirs
        assert time.monotonic() < deadline, f"replica never caught up: {ours['replica']} {theirs['replica']}"
        time.sleep(0.2)


# --- registration ---------------------------------------------------------------------------------------


def test_the_plugin_mounts_the_app_and_puts_sync_status_in_the_navigation(airflow_app):
    (info,) = [p for p in plugins_manager.get_plugin_info() if p["name"] == "opsync_sync_status"]
    (view,) = info["external_views"]
    assert view | {"icon": ""} == {
        "name": "Sync status",
        "href": "/opsync/",
        "icon": "",
        "destination": "nav",
        "url_route": "sync-status",
        "nav_top_level": True,
    }
    assert [a["url_prefix"] for a in info["fastapi_apps"]] == ["/opsync"]
    assert plugins_manager.get_import_errors() == {}


# --- figures ----------------------------------------------------------------------------------------------


def test_figures_equal_opsync_status_and_are_coloured_by_the_thresholds(client, site, primary, planning, token, monkeypatch):
    poison(site, primary, planning)  # one applied, two dead-lettered
    drain_metrics.record_batch(site, records=7, transactions=3, seconds=0.3, round_trips=2)
    monkeypatch.setenv("OPSYNC_ALERT_DEPTH_WARN", "1")  # nothing buffered: stays ok
    monkeypatch.setenv("OPSYNC_ALERT_AWAITING_REPLICA_WARN", "1")
    viewer = token("viewer")

    ours, theirs = quiet_status(client, viewer)

    def steady(report: dict) -> dict:
        """What cannot move between two measurements a moment apart."""
        slot = report["replica"]["slot"] | {"safe_wal_size": 0, "safe_fraction": 0, "restart_lsn": ""}  # WAL moves on
        return report | {
            "at": "",
            "buffer": report["buffer"] | {"oldest_age_s": 0, "last_drain_s": 0, "last_confirm_s": 0},
            "replica": report["replica"] | {"primary_lsn": "", "replica_lsn": "", "slot": slot},
        }

    common = {"at", "degraded", "buffer", "replica", "unavailable"}  # SiteStatus.as_json(); the CLI may add more
    assert steady({k: ours[k] for k in common}) == steady({k: theirs[k] for k in common})
    assert (theirs["buffer"]["depth"], theirs["buffer"]["dead_letters"]) == (0, 2)
    assert abs(ours["buffer"]["last_drain_s"] - theirs["buffer"]["last_drain_s"]) < 5
    assert ours["drain"]["records_applied_last_hour"] >= 7 and len(ours["drain"]["rate_per_minute"]) == 60
    levels = {figure: f["level"] for figure, f in ours["findings"].items()}
    assert levels["dead_letters"] == "critical" and levels["depth"] == "ok" and levels["lag_bytes"] == "ok"

    shown = page(client, viewer)
    buffer = theirs["buffer"]
    for figure, expected in {
        "depth": buffer["depth"],
        "dead_letters": buffer["dead_letters"],
        "lag_bytes": 0,
        "awaiting_replica": buffer["committed_not_replicated"],
        "drain_failed_runs": 0,
    }.items():
        assert shown.figures[figure]["value"] == str(expected), (figure, shown.figures[figure])
    assert shown.figures["dead_letters"]["level"] == "critical"
    assert shown.figures["awaiting_replica"]["level"] == ("warn" if buffer["committed_not_replicated"] else "ok")
    assert len(shown.bars) == 60 and sum(shown.bars) == ours["drain"]["records_applied_last_hour"]
    assert shown.buttons == []  # a viewer sees no requeue or discard
    slot = theirs["replica"]["slot"]
    assert (slot["name"], slot["wal_status"], slot["active"]) == ("observatory", "reserved", True)
    assert shown.figures["replica_slot"]["level"] == "ok" and int(shown.figures["replica_slot"]["value"]) > 0
    assert {"high_water", "drain_eta"} <= shown.figures.keys() and ours["capacity"]["room"] > 0  # the forecasts


def test_rows_the_read_model_skips_and_its_freshness_are_figures_of_the_page(client, site, token):
    """As the publisher lists them in Redis (its own function); nothing buffered and no publisher yet: caught up."""
    row = Poison(
        "executed_obs_unit",
        str(uuid.uuid4()),
        "replica changes",
        "RecursionError: maximum recursion depth",
        "2026-11-21T03:00:00.000000+00:00",
    )
    store_poison(site, {(row.table, row.key): row}, 1)
    viewer = token("viewer")

    report = client.get(STATUS, headers=bearer(viewer)).json()
    shown = page(client, viewer)

    assert report["read_model"]["poison_rows"] == 1 and report["read_model"]["recent_poison"][0]["key"] == row.key
    assert shown.figures["poison_rows"] == {"level": "warn", "value": "1"}
    assert row.key in report["findings"]["poison_rows"]["message"]
    assert shown.figures["read_model_freshness_s"] == {"level": "ok", "value": "0.0"}
    client.cookies.set("_token", viewer)
    assert f'<tr data-key="{row.key}"><td>executed_obs_unit</td>' in client.get("/opsync/").text


def test_redis_down_shows_unavailable_and_answers_503_not_500(client, token, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_BUFFER", f"redis://127.0.0.1:{free_port()}/0")
    viewer = token("viewer")

    report = client.get(STATUS, headers=bearer(viewer)).json()
    assert "redis" in report["unavailable"] and report["buffer"] is None and report["drain"] is None
    assert report["findings"]["dead_letters"]["level"] == "warn"  # unknown is worth a look, never "ok"
    shown = page(client, viewer)
    assert shown.figures["depth"] == {"level": "warn", "value": ""}
    listed = client.get("/opsync/api/dead-letters", headers=bearer(viewer))
    assert listed.status_code == 503 and "site buffer (Redis) unavailable" in listed.json()["detail"]


def test_an_unreachable_primary_or_a_missing_connection_is_reported_not_a_500(client, token, monkeypatch):
    viewer = token("viewer")
    monkeypatch.setenv("AIRFLOW_CONN_OPSYNC_PRIMARY", f"postgresql://opsync:x@127.0.0.1:{free_port()}/opsync")

    report = client.get(STATUS, headers=bearer(viewer)).json()
    assert "primary" in report["unavailable"] and report["buffer"]["depth"] == 0 and report["replica"]["lag_from"] == "replica"
    assert report["findings"]["lag_bytes"]["level"] == "warn" and "primary" in report["findings"]["lag_bytes"]["message"]
    assert 'data-unavailable="primary"' in client.get("/opsync/", headers=bearer(viewer)).text

    monkeypatch.delenv("AIRFLOW_CONN_OPSYNC_BUFFER")
    missing = client.get(STATUS, headers=bearer(viewer))
    assert missing.status_code == 503 and "opsync_buffer" in missing.json()["detail"]


# --- auth matrix ---------------------------------------------------------------------------------------------


def forged(token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, "not-the-api-servers-secret-" + "x" * 64, algorithm="HS512")


def unsigned(token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none")


def test_auth_matrix_for_reading(client, token, auth_manager):
    revoked = token("admin")
    auth_manager.revoke_token(revoked)
    refused = {
        "anonymous": {},
        "malformed": bearer("not-a-jwt"),
        "empty bearer": {"Authorization": "Bearer "},
        "wrong signature": bearer(forged(token("admin"))),
        "unsigned (alg none)": bearer(unsigned(token("admin"))),
        "expired": bearer(token("admin", expiration_time_in_seconds=-3600)),
        "revoked (signed out)": bearer(revoked),
    }
    for case, headers in refused.items():
        answer = client.get(STATUS, headers=headers)
        assert answer.status_code == 401, (case, answer.status_code, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer" and "sign in" in answer.json()["detail"], case

    no_role = client.get(STATUS, headers=bearer(token(None, name="nobody")))
    assert no_role.status_code == 403 and "nobody may not read" in no_role.json()["detail"]
    for role in ("viewer", "user", "op", "admin"):
        assert client.get(STATUS, headers=bearer(token(role))).status_code == 200, role
        assert client.get("/opsync/api/history", headers=bearer(token(role))).json() == [], role


def test_the_page_sends_anonymous_people_to_airflows_login_and_back(client, token):
    for cookie in (None, "not-a-jwt", token("viewer", expiration_time_in_seconds=-3600)):
        if cookie:
            client.cookies.set("_token", cookie)
        answer = client.get("/opsync/", follow_redirects=False)
        client.cookies.clear()
        assert answer.status_code == 303, cookie
        assert answer.headers["location"] == "/auth/login?next=http%3A%2F%2Ftestserver%2Fopsync%2F", cookie

    client.cookies.set("_token", token(None, name="nobody"))
    refused = client.get("/opsync/")
    client.cookies.clear()
    assert refused.status_code == 403 and "signed in as <strong>nobody</strong>" in refused.text

    shown = client.get("/opsync/", headers=bearer(token("viewer")))
    assert shown.status_code == 200 and shown.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in shown.headers["Content-Security-Policy"] and shown.headers["Cache-Control"] == "no-store"


def test_auth_matrix_for_requeue_and_discard(client, site, primary, planning, token):
    missing_obs, bad, dependant, _ = poison(site, primary, planning)
    fix_cause(primary, planning, missing_obs)
    txn = str(bad.txn_id)
    requeue = f"/opsync/api/dead-letters/{txn}/requeue"

    for case, headers in {
        "anonymous": {},
        "expired": bearer(token("op", expiration_time_in_seconds=-3600)),
        "wrong signature": bearer(forged(token("op"))),
    }.items():
        assert client.post(requeue, headers=headers).status_code == 401, case
    for role in (None, "viewer", "user"):  # "user" may run DAGs, not change the buffer
        answer = client.post(requeue, headers=bearer(token(role, name=f"{role}-person")))
        assert answer.status_code == 403 and "op or admin role" in answer.json()["detail"], role
        assert client.post(f"/opsync/api/dead-letters/{txn}/discard", headers=bearer(token(role))).status_code == 403, role

    op = token("op", name="otto")
    client.cookies.set("_token", op)  # a browser: the cookie alone is not enough
    try:
        no_csrf = client.post(requeue)
        wrong_csrf = client.post(requeue, headers={CSRF_HEADER: "0" * 64})
        not_ascii = client.post(requeue, headers={CSRF_HEADER: "é".encode()})
        assert {no_csrf.status_code, wrong_csrf.status_code, not_ascii.status_code} == {403}
        assert CSRF_HEADER in no_csrf.json()["detail"]
        assert [d.txn_id for d in dlq.dead_letters(site)] == [txn, str(dependant.txn_id)]  # nothing changed so far
        csrf = Figures(client.get("/opsync/").text).meta["csrf-token"]
        accepted = client.post(requeue, headers={CSRF_HEADER: csrf}, json={})
    finally:
        client.cookies.clear()
    assert accepted.status_code == 200, accepted.text
    assert [(a["txn_id"], a["by"], a["changed"]) for a in accepted.json()["actions"]] == [
        (txn, "otto", True),
        (str(dependant.txn_id), "otto", True),
    ]
    viewer_csrf = Figures(client.get("/opsync/", headers=bearer(token("viewer"))).text).meta["csrf-token"]
    assert viewer_csrf != csrf  # bound to the user: one person's page cannot act for another


def test_requeue_applies_exactly_once_however_often_it_is_clicked(client, site, primary, planning, token):
    missing_obs, bad, dependant, good = poison(site, primary, planning)
    fix_cause(primary, planning, missing_obs)
    op = bearer(token("op", name="otto"))
    shown = page(client, token("op", name="otto"))
    assert {(b["data-action"], b["data-txn"]) for b in shown.buttons} == {
        ("requeue", str(bad.txn_id)),
        ("discard", str(bad.txn_id)),
        ("requeue", str(dependant.txn_id)),
        ("discard", str(dependant.txn_id)),
    }

    first = client.post(f"/opsync/api/dead-letters/{bad.txn_id}/requeue", headers=op)
    second = client.post(f"/opsync/api/dead-letters/{bad.txn_id}/requeue", headers=op)  # the double click

    assert [a["changed"] for a in first.json()["actions"]] == [True, True]
    assert [(a["changed"], a["by"]) for a in second.json()["actions"]] == [(False, "otto")]
    assert unsent(site) == 2 and dlq.dead_letters(site) == []
    assert drain.drain(site, primary).applied == 2
    assert in_ledger(primary, [bad, dependant, good]) == 3
    assert drain.drain(site, primary).batches == 0
    again = client.post(f"/opsync/api/dead-letters/{bad.txn_id}/requeue", headers=op)
    assert again.status_code == 200 and [a["changed"] for a in again.json()["actions"]] == [False]
    assert [(e["action"], e["by"]) for e in dlq.history(site)] == [("requeue", "otto")] * 2


def test_discard_is_audited_with_who_and_when(client, site, primary, planning, token):
    _, bad, dependant, _ = poison(site, primary, planning)
    admin = bearer(token("admin", name="ada"))

    answer = client.post(f"/opsync/api/dead-letters/{bad.txn_id}/discard", headers=admin)

    assert answer.status_code == 200, answer.text
    (action,) = answer.json()["actions"]
    assert (action["action"], action["by"], action["changed"]) == ("discard", "ada", True)
    assert answer.json()["still_dead_lettered"] == [str(dependant.txn_id)]
    (entry,) = client.get("/opsync/api/history", headers=admin).json()
    assert (entry["action"], entry["by"], entry["at"], entry["txn_id"]) == ("discard", "ada", action["at"], str(bad.txn_id))
    assert "foreign key" in entry["reason"]
    audit = page(client, token("viewer")).audit
    assert [(row["data-action"], row["data-by"], row["data-txn"]) for row in audit] == [("discard", "ada", str(bad.txn_id))]
    repeated = client.post(f"/opsync/api/dead-letters/{bad.txn_id}/discard", headers=admin).json()["actions"]
    assert [(a["changed"], a["at"]) for a in repeated] == [(False, action["at"])]
    requeued = client.post(f"/opsync/api/dead-letters/{bad.txn_id}/requeue", headers=admin)
    assert requeued.status_code == 404 and "was discarded" in requeued.json()["detail"]


def test_bad_input_is_a_clear_4xx(client, site, primary, planning, token):
    _, bad, _, _ = poison(site, primary, planning)
    admin = bearer(token("admin"))
    base = "/opsync/api/dead-letters"

    not_an_id = client.post(f"{base}/robert');DROP/requeue", headers=admin)
    assert not_an_id.status_code == 422 and not_an_id.json()["detail"][0]["loc"] == ["path", "txn"]
    unknown = client.post(f"{base}/{uuid.uuid4()}/requeue", headers=admin)
    assert unknown.status_code == 404 and "no dead-lettered transaction" in unknown.json()["detail"]
    assert client.get(f"{base}/{uuid.uuid4()}", headers=admin).status_code == 404
    extra = client.post(f"{base}/{bad.txn_id}/requeue", headers=admin, json={"with_dependants": False, "force": True})
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "force"]
    wrong_type = client.post(f"{base}/{bad.txn_id}/requeue", headers=admin, json={"with_dependants": "perhaps"})
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["loc"] == ["body", "with_dependants"]
    not_json = client.post(f"{base}/{bad.txn_id}/requeue", headers=admin | {"Content-Type": "application/json"}, content=b"{")
    assert not_json.status_code == 422
    shown = client.get(f"{base}/{bad.txn_id}", headers=admin).json()
    assert shown["steps"][0]["table"] == "raw_data_file" and "foreign key" in shown["reason"] and len(shown["dependants"]) == 1
    alone = client.post(f"{base}/{bad.txn_id}/requeue", headers=admin, json={"with_dependants": False})
    assert [a["txn_id"] for a in alone.json()["actions"]] == [str(bad.txn_id)]
