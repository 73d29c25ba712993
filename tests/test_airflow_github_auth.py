"""GitHub sign-in to the Airflow UI (``deploy/airflow/webserver_config.py``), offline.

A real ``airflow api-server`` with the FAB auth manager runs in a subprocess with its own
AIRFLOW_HOME (Airflow reads its config once per process; this session's ``configure_airflow`` stays
untouched). GitHub is a small real HTTP server in a thread: authorize page, token endpoint and the
three API calls the config makes. httpx plays the browser. The pure mapping functions are tested by
loading the same file into this process.
"""

from tests.airflow_home import configure_airflow

configure_airflow()  # loading webserver_config.py below imports Airflow

import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import parse_qs, urlencode, urlsplit  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from devstack.airflow import AIRFLOW, airflow_env, migrate_metadata_db, new_airflow_secrets  # noqa: E402
from devstack.settings import REPO  # noqa: E402
from tests.conftest import free_port  # noqa: E402

CONFIG_FILE = REPO / "deploy" / "airflow" / "webserver_config.py"
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
ORG = "atacama-obs"
TEAM_ROLES = "observatory-ops=Op,observatory-admins=Admin,scientists=Viewer"
CLIENT_ID = "Iv1.opsync-test"
TEAMS_PAGE = 2  # the fake pages /user/teams by 2, so the config must follow Link headers


@dataclass
class GitHubUser:
    login: str
    name: str | None = None
    email: str | None = None
    membership: str | None = "active"  # state in ORG; None: not a member
    teams: list[tuple[str, str]] = field(default_factory=list)  # (organisation, team slug)


class FakeGitHub(ThreadingHTTPServer):
    """github.com's OAuth endpoints and api.github.com under ``/api``, for whichever user ``signing_in`` names."""

    daemon_threads = True

    def __init__(self, client_secret: str):
        super().__init__(("127.0.0.1", 0), GitHubHandler)
        self.client_secret = client_secret
        self.users: dict[str, GitHubUser] = {}
        self.signing_in: str | None = None
        self.codes: dict[str, tuple[str, str]] = {}  # code -> (login, redirect_uri)
        self.tokens: dict[str, str] = {}  # access token -> login

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class GitHubHandler(BaseHTTPRequestHandler):
    server: FakeGitHub

    def log_message(self, format, *args) -> None:
        """Quiet: pytest shows failures, not every request."""

    def reply(self, status: int, body=None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/login/oauth/authorize":
            self.authorize(query)
        elif url.path.startswith("/api/"):
            self.api(url.path.removeprefix("/api"), query)
        else:
            self.reply(404, {"message": "Not Found"})

    def do_POST(self) -> None:
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
        if self.path != "/login/oauth/access_token":
            self.reply(404, {"message": "Not Found"})
        elif form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.server.client_secret:
            self.reply(200, {"error": "incorrect_client_credentials"})
        elif self.server.codes.get(form.get("code", "")) is None:
            self.reply(200, {"error": "bad_verification_code"})
        else:
            login, redirect_uri = self.server.codes.pop(form["code"])
            if form.get("redirect_uri") != redirect_uri:
                self.reply(200, {"error": "redirect_uri_mismatch"})
                return
            token = "gho_" + secrets.token_hex(18)
            self.server.tokens[token] = login
            self.reply(200, {"access_token": token, "token_type": "bearer", "scope": "read:org"})

    def authorize(self, query: dict[str, str]) -> None:
        """GitHub after the user clicked "Authorize": back to the app with a code and the app's state."""
        if query.get("client_id") != CLIENT_ID or query.get("scope") != "read:org" or not query.get("state"):
            self.reply(400, {"error": "bad authorize request", "query": query})
            return
        code = secrets.token_hex(10)
        self.server.codes[code] = (self.server.signing_in, query["redirect_uri"])
        target = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"
        self.reply(302, headers={"Location": target})

    def api(self, path: str, query: dict[str, str]) -> None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        login = self.server.tokens.get(token) if scheme.lower() == "bearer" else None
        if login is None:
            self.reply(401, {"message": "Bad credentials"})
            return
        user = self.server.users[login]
        if path == "/user":
            self.reply(200, {"login": user.login, "id": hash(user.login) % 10**8, "name": user.name, "email": user.email})
        elif path == f"/user/memberships/orgs/{ORG}":
            if user.membership is None:
                self.reply(404, {"message": "Not Found"})
            else:
                self.reply(200, {"state": user.membership, "role": "member", "organization": {"login": ORG}})
        elif path == "/user/teams":
            self.teams_page(user, int(query.get("page", "1")), int(query.get("per_page", "30")))
        else:
            self.reply(404, {"message": "Not Found"})

    def teams_page(self, user: GitHubUser, page: int, per_page: int) -> None:
        size = min(per_page, TEAMS_PAGE)
        teams = [{"slug": slug, "name": slug.title(), "organization": {"login": org}} for org, slug in user.teams]
        chunk = teams[(page - 1) * size : page * size]
        headers = {}
        if page * size < len(teams):
            headers["Link"] = f'<{self.server.url}/api/user/teams?per_page={per_page}&page={page + 1}>; rel="next"'
        self.reply(200, chunk, headers)


@dataclass
class AirflowSite:
    url: str
    home: Path
    log: Path
    github: FakeGitHub
    client_secret: str

    def roles(self, username: str) -> set[str] | None:
        """The FAB roles of a user in the metadata DB; None when no such user exists."""
        with sqlite3.connect(self.home / "airflow.db") as db:
            user = db.execute("SELECT id FROM ab_user WHERE username = ?", (username,)).fetchone()
            if user is None:
                return None
            rows = db.execute("SELECT r.name FROM ab_user_role ur JOIN ab_role r ON r.id = ur.role_id WHERE ur.user_id = ?", user)
            return {name for (name,) in rows}

    def sign_in(self, login: str, next_path: str | None = None) -> tuple[httpx.Client, httpx.Response]:
        """A fresh browser signs in as ``login`` on the fake GitHub, following every redirect to the last page."""
        self.github.signing_in = login
        browser = httpx.Client(base_url=self.url, follow_redirects=True, timeout=30)
        page = browser.get("/auth/login/github", params={"next": next_path} if next_path else None)
        return browser, page


def fab_github_env(home: Path, port: int, github_url: str, client_secret: str) -> dict[str, str]:
    """The env of an Airflow whose FAB auth manager reads our webserver_config.py, pointed at the fake GitHub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(airflow_env(home, port, new_airflow_secrets(), REPO))
    for simple_only in ("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"):
        env.pop(simple_only)
    env.update(
        {
            "AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER,
            "AIRFLOW__FAB__CONFIG_FILE": str(CONFIG_FILE),
            "AIRFLOW_GITHUB_CLIENT_ID": CLIENT_ID,
            "AIRFLOW_GITHUB_CLIENT_SECRET": client_secret,
            "AIRFLOW_GITHUB_ORG": ORG,
            "AIRFLOW_GITHUB_TEAM_ROLES": TEAM_ROLES,
            "AIRFLOW_GITHUB_URL": github_url,
            "AIRFLOW_GITHUB_API_URL": f"{github_url}/api",
        }
    )
    return env


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"airflow api-server exited {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"airflow api-server not up after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (its workers too), then SIGKILL if it lingers."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def site():
    client_secret = secrets.token_urlsafe(24)
    github = FakeGitHub(client_secret)
    threading.Thread(target=github.serve_forever, daemon=True).start()
    home = Path(tempfile.mkdtemp(prefix="opsync-airflow-fab-"))
    port = free_port()
    env = fab_github_env(home, port, github.url, client_secret)
    migrate_metadata_db(env)  # also creates the FAB tables (the auth manager's DB manager)
    log = home / "api-server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [AIRFLOW, "api-server", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, log)
        yield AirflowSite(f"http://127.0.0.1:{port}", home, log, github, client_secret)
    finally:
        stop(server)
        github.shutdown()
        github.server_close()
        shutil.rmtree(home, ignore_errors=True)


def add_user(site: AirflowSite, login: str, *teams: str, **attrs) -> None:
    site.github.users[login] = GitHubUser(login, teams=[(ORG, slug) for slug in teams], **attrs)


def api_token(browser: httpx.Client) -> str | None:
    return browser.cookies.get("_token")


def api(site: AirflowSite, token: str) -> httpx.Client:
    return httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_login_redirects_to_github_with_client_id_scope_state_and_callback(site):
    response = httpx.get(f"{site.url}/auth/login/github", follow_redirects=False)
    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{site.github.url}/login/oauth/authorize"
    assert query["client_id"] == CLIENT_ID
    assert query["scope"] == "read:org"
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == f"{site.url}/auth/oauth-authorized/github"
    assert len(query["state"]) > 20
    assert "session" in response.cookies  # the state is bound to this browser


def test_login_page_offers_github(site):
    page = httpx.get(f"{site.url}/auth/login/", timeout=30)
    assert page.status_code == 200
    assert 'id="btn-signin-github"' in page.text


def test_ops_team_member_signs_in_as_op_and_can_use_the_api(site):
    add_user(site, "ana", "observatory-ops", name="Ana Pérez", email="ana@example.org")
    browser, page = site.sign_in("ana")
    assert page.status_code == 200
    assert page.url.path in ("", "/")  # the Airflow UI, not the login page
    token = api_token(browser)
    assert token
    assert site.roles("github_ana") == {"Op", "Public"}
    with api(site, token) as client:
        assert client.get("/api/v2/dags").status_code == 200
        created = client.post("/api/v2/pools", json={"name": "ana_pool", "slots": 1})
        assert created.status_code == 201, created.text
        assert client.get("/auth/fab/v1/users").status_code == 403  # user management is for admins


def test_admins_team_member_signs_in_as_admin(site):
    add_user(site, "bea", "observatory-admins")
    token = api_token(site.sign_in("bea")[0])
    assert site.roles("github_bea") == {"Admin", "Public"}
    with api(site, token) as client:
        users = client.get("/auth/fab/v1/users")
        assert users.status_code == 200
        assert "github_bea" in {user["username"] for user in users.json()["users"]}


def test_scientist_gets_viewer_and_may_only_read(site):
    add_user(site, "carl", "scientists", name="Carl")
    token = api_token(site.sign_in("carl")[0])
    assert site.roles("github_carl") == {"Viewer", "Public"}
    with api(site, token) as client:
        assert client.get("/api/v2/dags").status_code == 200
        assert client.post("/api/v2/pools", json={"name": "carl_pool", "slots": 1}).status_code == 403


def test_teams_of_other_organisations_and_further_pages_count_correctly(site):
    """Five teams on three pages; a same-named team of another organisation grants nothing."""
    add_user(site, "dora", "choir", "football", "chess", "scientists")
    site.github.users["dora"].teams.insert(0, ("another-org", "observatory-admins"))
    token = api_token(site.sign_in("dora")[0])
    assert token
    assert site.roles("github_dora") == {"Viewer", "Public"}


def test_member_of_several_teams_gets_every_mapped_role(site):
    add_user(site, "emil", "scientists", "observatory-ops")
    site.sign_in("emil")
    assert site.roles("github_emil") == {"Op", "Viewer", "Public"}


def test_user_outside_the_organisation_is_refused_with_a_clear_message(site):
    add_user(site, "mallory", "observatory-admins", membership=None)
    page = refusal_page(site, "mallory")
    assert f"GitHub user mallory is not a member of the organisation {ORG}." in page
    assert site.roles("github_mallory") is None


def test_pending_invitation_and_member_without_a_listed_team_are_refused(site):
    add_user(site, "pat", "observatory-ops", membership="pending")
    add_user(site, "quinn", "choir")
    assert "has not yet accepted the invitation" in refusal_page(site, "pat")
    assert "quinn is in none of the teams of atacama-obs that give access" in refusal_page(site, "quinn")
    assert site.roles("github_pat") is None
    assert site.roles("github_quinn") is None


def refusal_page(site: AirflowSite, login: str) -> str:
    """The page a refused user lands on: FAB's login page with the flashed reason, and no way into the API."""
    browser, page = site.sign_in(login)
    assert page.url.path == "/auth/login/"
    assert api_token(browser) is None
    assert browser.get("/api/v2/dags").status_code == 401
    return page.text


def test_roles_follow_team_changes_at_every_sign_in(site):
    add_user(site, "rosa", "observatory-ops")
    site.sign_in("rosa")
    assert site.roles("github_rosa") == {"Op", "Public"}
    site.github.users["rosa"].teams = [(ORG, "scientists")]
    site.sign_in("rosa")
    assert site.roles("github_rosa") == {"Viewer", "Public"}
    site.github.users["rosa"].membership = None
    assert "not a member of the organisation" in refusal_page(site, "rosa")


def test_callback_with_a_forged_state_is_refused(site):
    add_user(site, "sam", "observatory-admins")
    site.github.signing_in = "sam"
    with httpx.Client(base_url=site.url, timeout=30) as browser:
        to_github = browser.get("/auth/login/github")
        back = httpx.get(to_github.headers["location"])
        callback = urlsplit(back.headers["location"])
        code = parse_qs(callback.query)["code"][0]
        refused = browser.get(callback.path, params={"code": code, "state": "forged"}, follow_redirects=True)
        assert refused.status_code == 200
        assert api_token(browser) is None
    assert site.roles("github_sam") is None


def test_next_url_is_kept_through_the_round_trip(site):
    add_user(site, "tess", "scientists")
    browser, page = site.sign_in("tess", next_path=f"{site.url}/dags")
    assert page.url.path == "/dags"
    assert api_token(browser)


def test_no_secret_reaches_the_logs(site):
    add_user(site, "uma", "observatory-ops")
    assert api_token(site.sign_in("uma")[0])
    logs = site.log.read_text() + "".join(p.read_text(errors="replace") for p in (site.home / "logs").rglob("*") if p.is_file())
    assert "signed in through teams observatory-ops" in logs  # the log does record who came in
    assert site.client_secret not in logs
    assert site.github.tokens and not any(token in logs for token in site.github.tokens)


GOOD_ENV = {
    "AIRFLOW_GITHUB_CLIENT_ID": CLIENT_ID,
    "AIRFLOW_GITHUB_CLIENT_SECRET": "not-a-real-secret-but-never-shown",
    "AIRFLOW_GITHUB_ORG": ORG,
    "AIRFLOW_GITHUB_TEAM_ROLES": TEAM_ROLES,
}


def load_config(monkeypatch, **env: str | None) -> dict:
    """Execute webserver_config.py in this process as Airflow would, with ``AIRFLOW_GITHUB_*`` set from ``env``."""
    for name in ("CLIENT_ID", "CLIENT_SECRET", "ORG", "TEAM_ROLES", "URL", "API_URL"):
        monkeypatch.delenv(f"AIRFLOW_GITHUB_{name}", raising=False)
    for name, value in {**GOOD_ENV, **env}.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return runpy.run_path(str(CONFIG_FILE))


@pytest.fixture
def config(monkeypatch) -> dict:
    return load_config(monkeypatch)


def test_config_maps_teams_to_roles_and_talks_to_github_by_default(config):
    assert config["AUTH_TYPE"] == 4  # flask_appbuilder.const.AUTH_OAUTH
    assert config["AUTH_ROLES_MAPPING"] == {
        "observatory-ops": ["Op"],
        "observatory-admins": ["Admin"],
        "scientists": ["Viewer"],
    }
    assert config["AUTH_ROLES_SYNC_AT_LOGIN"] is True
    assert config["AUTH_USER_REGISTRATION"] is True
    assert config["AUTH_USER_REGISTRATION_ROLE"] == "Public"
    (provider,) = config["OAUTH_PROVIDERS"]
    remote = provider["remote_app"]
    assert provider["name"] == "github"
    assert remote["authorize_url"] == "https://github.com/login/oauth/authorize"
    assert remote["access_token_url"] == "https://github.com/login/oauth/access_token"
    assert remote["api_base_url"] == "https://api.github.com/"
    assert remote["client_kwargs"]["scope"] == "read:org"
    assert remote["client_secret"] == GOOD_ENV["AIRFLOW_GITHUB_CLIENT_SECRET"]
    assert GOOD_ENV["AIRFLOW_GITHUB_CLIENT_SECRET"] not in repr(config["SETTINGS"])


def test_github_enterprise_urls_are_taken_as_given(monkeypatch):
    remote = load_config(
        monkeypatch, AIRFLOW_GITHUB_URL="https://git.example.org/", AIRFLOW_GITHUB_API_URL="https://git.example.org/api/v3"
    )["OAUTH_PROVIDERS"][0]["remote_app"]
    assert remote["authorize_url"] == "https://git.example.org/login/oauth/authorize"
    assert remote["api_base_url"] == "https://git.example.org/api/v3/"


@pytest.mark.parametrize(
    ("env", "named", "reason"),
    [
        ({"AIRFLOW_GITHUB_CLIENT_ID": None}, "AIRFLOW_GITHUB_CLIENT_ID", "Field required"),
        ({"AIRFLOW_GITHUB_CLIENT_SECRET": ""}, "AIRFLOW_GITHUB_CLIENT_SECRET", "at least 1"),
        ({"AIRFLOW_GITHUB_ORG": "not/an-org"}, "AIRFLOW_GITHUB_ORG", "should match pattern"),
        ({"AIRFLOW_GITHUB_TEAM_ROLES": None}, "AIRFLOW_GITHUB_TEAM_ROLES", "Field required"),
        ({"AIRFLOW_GITHUB_TEAM_ROLES": "ops"}, "AIRFLOW_GITHUB_TEAM_ROLES", "'ops' is not team-slug=Role"),
        ({"AIRFLOW_GITHUB_TEAM_ROLES": "ops=Op,OPS=Viewer"}, "AIRFLOW_GITHUB_TEAM_ROLES", "'ops' is listed twice"),
        ({"AIRFLOW_GITHUB_TEAM_ROLES": " , "}, "AIRFLOW_GITHUB_TEAM_ROLES", "nobody could sign in"),
        ({"AIRFLOW_GITHUB_API_URL": "api.github.com"}, "AIRFLOW_GITHUB_API_URL", "should match pattern"),
    ],
)
def test_bad_settings_stop_the_server_naming_the_variable_never_the_secret(monkeypatch, env, named, reason):
    with pytest.raises(RuntimeError) as error:
        load_config(monkeypatch, **env)
    message = str(error.value)
    assert named in message
    assert reason in message
    assert GOOD_ENV["AIRFLOW_GITHUB_CLIENT_SECRET"] not in message


@pytest.mark.parametrize(
    ("text", "mapping"),
    [
        ("observatory-ops=Op", {"observatory-ops": ["Op"]}),
        (" Observatory-Ops = Op ,scientists=Viewer,", {"observatory-ops": ["Op"], "scientists": ["Viewer"]}),
        ("night_crew=Night Operator", {"night_crew": ["Night Operator"]}),
    ],
)
def test_parse_team_roles(config, text, mapping):
    assert config["parse_team_roles"](text) == mapping


@pytest.mark.parametrize("text", ["=Op", "ops=", "ops=Op=Admin", "ops Op", "o/ps=Op"])
def test_parse_team_roles_refuses_malformed_entries(config, text):
    with pytest.raises(ValueError, match="is not team-slug=Role"):
        config["parse_team_roles"](text)


def test_only_teams_of_the_organisation_count(config):
    teams = [
        {"slug": "observatory-ops", "organization": {"login": "Atacama-Obs"}},
        {"slug": "observatory-admins", "organization": {"login": "another-org"}},
        {"slug": "scientists", "organization": None},
    ]
    assert config["org_team_slugs"](teams, ORG) == ["observatory-ops"]


def test_user_info_keeps_only_teams_that_grant_a_role(config):
    info = config["user_info"](
        {"login": "ana", "name": "Ana María Pérez", "email": None},
        ["choir", "observatory-ops", "scientists"],
        config["AUTH_ROLES_MAPPING"],
        ORG,
    )
    assert info == {
        "username": "github_ana",
        "email": "",
        "first_name": "Ana",
        "last_name": "María Pérez",
        "role_keys": ["observatory-ops", "scientists"],
    }


def test_user_info_refuses_a_member_of_no_listed_team(config):
    with pytest.raises(config["SignInRefused"], match="quinn is in none of the teams of atacama-obs"):
        config["user_info"]({"login": "quinn"}, ["choir"], config["AUTH_ROLES_MAPPING"], ORG)
