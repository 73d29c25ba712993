"""The Sync status page in a real ``airflow api-server`` driven by headless Chromium over the DevTools protocol.

An operator signs in through the simple auth manager's login form, opens "Sync status" from Airflow's
navigation (the page shows inside Airflow's frame), sees the figures ``opsync status`` gives,
double-clicks "Requeue" on a dead-lettered transaction and confirms; the transaction is requeued
once, by them, and the next drain applies it exactly once. The console must stay free of errors
from the page (a Content-Security-Policy violation would show there).
"""

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine
from websockets.sync.client import connect

from devstack.airflow import AIRFLOW, airflow_env, migrate_metadata_db, new_airflow_secrets, passwords_file
from devstack.process import write_private
from devstack.settings import REPO
from opsync import cli, dlq, drain
from opsync.buffer import Buffer
from tests.conftest import free_port
from tests.test_browser import CHROMIUM, OPTED_OUT, WINDOW, chromium_installed  # noqa: F401 (the fixture fails without chromium)
from tests.test_dlq import fix_cause, in_ledger, poison, unsent

pytestmark = OPTED_OUT
USERS = {"otto": ("op", "otto-password-4f1c"), "vera": ("viewer", "vera-password-9a2e")}  # name: (role, password)
START_TIMEOUT_S = 120  # the API server is ready in 17–25 s on an idle machine; this one is shared
DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")


@pytest.fixture
def site(migrated, own_redis) -> Buffer:
    return Buffer(own_redis.client())


@pytest.fixture
def api_server(migrated, own_redis, tmp_path):
    """``airflow api-server`` alone (no scheduler: the page needs none) with the plugin from its entry point and the site's connections."""
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        **airflow_env(home, port, new_airflow_secrets(), REPO),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{name}:{role}" for name, (role, _) in USERS.items()),
        "AIRFLOW_CONN_OPSYNC_BUFFER": own_redis.url,
        "AIRFLOW_CONN_OPSYNC_PRIMARY": migrated.primary.url(driver="postgresql"),
        "AIRFLOW_CONN_OPSYNC_REPLICA": migrated.replica.url(driver="postgresql"),
    }
    write_private(passwords_file(home), json.dumps({name: password for name, (_, password) in USERS.items()}))
    migrate_metadata_db(env)
    log = open(tmp_path / "api-server.log", "wb")
    server = subprocess.Popen(
        [AIRFLOW, "api-server", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(base), START_TIMEOUT_S, lambda: (tmp_path / "api-server.log").read_text()[-3000:])
        yield base
    finally:
        stop_group(server)
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with the DevTools protocol on a free port; yields the first tab."""
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in process.stderr:
            if match := DEVTOOLS.search(line):
                break
        else:
            raise RuntimeError("Chromium ended before offering DevTools")
        http = match[1].split("/devtools/")[0].replace("ws://", "http://")
        (tab,) = [t for t in httpx.get(f"{http}/json/list").json() if t["type"] == "page"]
        with Tab(tab["webSocketDebuggerUrl"]) as page:
            yield page
    finally:
        stop_group(process)


class Tab:
    """A Chromium tab over the DevTools protocol: evaluate JavaScript, type, take screenshots, collect console errors."""

    def __init__(self, url: str) -> None:
        self.ws = connect(url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.errors: list[str] = []

    def __enter__(self) -> "Tab":
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        return self

    def __exit__(self, *exc) -> None:
        self.ws.close()

    def send(self, method: str, **params) -> dict:
        call = next(self.ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.event(message)

    def event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"{details.get('url', '')}: {details.get('exception', {}).get('description', details['text'])}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry'].get('url', '')}: {params['entry']['text']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """The value of ``expression`` once truthy (the SPA renders after its own fetches)."""
        return wait_until(lambda: self.evaluate(expression), timeout, lambda: self.evaluate(SHOWN))

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))


def wait_until(probe, timeout: float, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s: {explain()}")
        time.sleep(0.25)


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_group(process: subprocess.Popen) -> None:
    """The process and its children (uvicorn workers, Chromium's helpers), by its process group only."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def cli_status() -> dict:
    result = CliRunner().invoke(cli.main, ["status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


FRAME = "document.querySelector('iframe')?.contentDocument"
SHOWN = f"location.href + ' | ' + document.body.innerText.slice(0, 300) + ' | frame: ' + {FRAME}?.body?.innerText?.slice(0, 1500)"
FIGURES = f"Object.fromEntries([...({FRAME}?.querySelectorAll('[data-figure]') ?? [])].map(e => [e.dataset.figure, e.dataset.value]))"


def test_operator_signs_in_opens_sync_status_from_the_nav_and_requeues_once(api_server, browser, site, migrated, planning, tmp_path):
    primary = create_engine(migrated.primary.url(), connect_args={"connect_timeout": 5})
    missing_obs, bad, dependant, good = poison(site, primary, planning)
    fix_cause(primary, planning, missing_obs)
    wait_until(lambda: cli_status()["replica"]["lag_bytes"] == 0, 15)
    expected = cli_status()
    name, (_, password) = "otto", USERS["otto"]

    browser.send("Page.navigate", url=f"{api_server}/")
    browser.wait_for("!!document.querySelector('input[name=password]')")  # Airflow sends us to its login form
    browser.type_into("input[name=username]", name)
    browser.type_into("input[name=password]", password)
    browser.wait_for("!document.querySelector('button[type=submit]').disabled")
    browser.evaluate("document.querySelector('button[type=submit]').click()")

    nav = browser.wait_for("document.querySelector('a[href$=\"plugin/sync-status\"]')?.getAttribute('href')")
    browser.evaluate("document.querySelector('a[href$=\"plugin/sync-status\"]').click()")
    assert browser.wait_for(f"{FRAME}?.querySelector('h1')?.textContent") == "Sync status", nav
    assert browser.evaluate("document.querySelector('iframe').getAttribute('src')").endswith("/opsync/")
    shown = browser.wait_for(f"Object.keys({FIGURES}).length && {FIGURES}")
    buffer = expected["buffer"]
    assert {k: shown[k] for k in ("depth", "awaiting_replica", "dead_letters", "lag_bytes")} == {
        "depth": str(buffer["depth"]),
        "awaiting_replica": str(buffer["committed_not_replicated"]),
        "dead_letters": str(buffer["dead_letters"]),
        "lag_bytes": str(expected["replica"]["lag_bytes"]),
    }
    assert buffer["dead_letters"] == 2
    assert browser.evaluate(f"{FRAME}.querySelector('#figure-dead_letters').dataset.level") == "critical"
    assert browser.evaluate(f"{FRAME}.querySelectorAll('#rate-chart rect.bar').length") == 60
    browser.screenshot(tmp_path / "sync-status.png")

    button = f"{FRAME}.querySelector('button[data-action=requeue][data-txn=\"{bad.txn_id}\"]')"
    browser.evaluate(f"(() => {{ const b = {button}; b.click(); b.click(); }})()")  # a double click
    question = browser.wait_for(f"{FRAME}.querySelector('#confirm-dialog[open]')?.textContent")
    assert f"Requeue {bad.txn_id} with what failed because of it?" in question
    assert unsent(site) == 0  # nothing happens before the confirmation
    browser.evaluate(f"{FRAME}.querySelector('#confirm-yes').click()")
    message = browser.wait_for(f"{FRAME}?.querySelector('#message:not([hidden])')?.textContent")

    assert f"{bad.txn_id}: requeued by otto" in message and f"{dependant.txn_id}: requeued by otto" in message
    assert browser.evaluate(f"{FRAME}.querySelector('#figure-dead_letters').dataset.value") == "0"
    rows = f"[...{FRAME}.querySelectorAll('#audit tr[data-by]')]"
    audit = browser.evaluate(f"{rows}.map(r => [r.dataset.action, r.dataset.by, r.dataset.txn])")
    assert audit == [["requeue", "otto", str(dependant.txn_id)], ["requeue", "otto", str(bad.txn_id)]]
    assert [(e["action"], e["by"], e["txn_id"]) for e in dlq.history(site)] == [tuple(row) for row in audit]
    assert unsent(site) == 2 and dlq.dead_letters(site) == []
    assert drain.drain(site, primary).applied == 2
    assert in_ledger(primary, [bad, dependant, good]) == 3
    page_errors = [e for e in browser.errors if "/opsync/" in e or "Content Security Policy" in e]
    assert not page_errors, page_errors
    if os.environ.get("OPSYNC_ARTIFACTS_DIR"):
        keep = Path(os.environ["OPSYNC_ARTIFACTS_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "sync-status.png", keep / "airflow-sync-status.png")
    primary.dispose()
