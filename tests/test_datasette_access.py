"""Who may read what in Datasette (the engine's allow blocks, ``opsync/read_model/datasette.yml``; ``opsync_access.py``), offline.

A real ``datasette serve`` in production mode (anonymous has no role) checks people by signed
``ds_actor`` cookies (made with ``datasette.sign``, as datasette-auth-github makes them) and scripts
by Bearer token. The GitHub sign-in flow runs in-process, with GitHub's API mocked by pytest-httpx.
"""

import asyncio
import re
import shutil
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from datasette.app import Datasette
from datasette.utils import baseconv

from datasette.plugins import pm
from opsync.read_model import metadata as served_metadata
from tests.test_datasette_views import DB, METADATA, datasette_site, fill_read_model, serve_datasette

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-datasette-secret-" + "s" * 32
TOKEN = "test-script-token-" + "t" * 32
ORG = "ccat-obs"
TEAM = f"{ORG}/observers"
GITHUB_ENV = {
    "DATASETTE_SECRET": SECRET,
    "OPSYNC_DATASETTE_PUBLIC": "false",
    "OPSYNC_DATASETTE_TOKEN": TOKEN,
    "OPSYNC_GITHUB_CLIENT_ID": "client-id-123",
    "OPSYNC_GITHUB_CLIENT_SECRET": "client-secret-456",
    "OPSYNC_GITHUB_ORG": ORG,
}
TABLES = [
    "executed_obs_unit",
    "raw_data_file",
    "raw_data_package",
    "housekeeping_sample",
    "obs_unit",
    "instrument",
    "instrument_module",
    "sync_metrics",
]
NEVER_PUBLISHED = ["api_token", "sync_ledger", "row_change", "row_change_horizon"]
WRITES = [
    "DELETE FROM raw_data_file",
    "INSERT INTO instrument (id, name) VALUES ('x', 'y')",
    "UPDATE raw_data_file SET _sync_state = 'replicated'",
    "DROP TABLE raw_data_file",
    "ATTACH DATABASE '/tmp/x.db' AS x",
    "PRAGMA writable_schema = 1",
]


def github_actor(login: str = "alice", orgs=(ORG,), teams=None, **extra) -> dict:
    actor = {
        "id": f"github:{sum(map(ord, login))}",
        "display": login,
        "gh_login": login,
        "gh_name": login.title(),
        "gh_email": None,
        "gh_orgs": list(orgs),
        "gh_ts": int(time.time()),
        **extra,
    }
    if teams is not None:
        actor["gh_teams"] = list(teams)
    return actor


def actor_cookie(actor: dict, secret: str = SECRET, expires_in: int | None = 3600) -> dict[str, str]:
    data = {"a": actor}
    if expires_in is not None:
        data["e"] = baseconv.base62.encode(int(time.time()) + expires_in)
    return {"ds_actor": Datasette([], secret=secret).sign(data, "actor")}


MEMBER = actor_cookie(github_actor())
BEARER = {"Authorization": f"Bearer {TOKEN}"}


# --- a real `datasette serve`, production settings -----------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with datasette_site(tmp_path_factory.mktemp("datasette-access"), env=GITHUB_ENV) as (base, rows, _):
        yield base, rows


@pytest.fixture(scope="module")
def base(site) -> str:
    return site[0]


def get(base: str, path: str, **kwargs) -> httpx.Response:
    return httpx.get(f"{base}{path}", timeout=10, **kwargs)


def data_paths(rows) -> list[str]:
    """Every kind of page that shows data: database, tables, a row, canned queries, SQL, dashboards."""
    return [
        f"/{DB}",
        f"/{DB}.json",
        *[f"/{DB}/{table}.json" for table in TABLES],
        f"/{DB}/executed_obs_unit",
        f"/{DB}/executed_obs_unit/{rows.evening}.json",
        f"/{DB}/tonights_observations.json",
        f"/{DB}/files_not_replicated",
        f"/{DB}.json?sql=select+1",
        "/-/dashboards/sync",
        "/-/dashboards/sync/buffer-depth",
        "/-/dashboards/observatory/records-per-hour",
    ]


def test_anonymous_sees_the_index_page_and_no_data(site):
    base, rows = site
    index = get(base, "/")
    assert index.status_code == 200 and f'href="/{DB}"' not in index.text
    assert "Sign in with GitHub" in index.text
    assert get(base, "/-/databases.json").status_code == 200  # health and version pages stay open
    assert DB not in get(base, "/.json").json()
    for path in data_paths(rows):
        assert get(base, path).status_code == 403, path
    assert get(base, "/-/actor.json").json() == {"actor": None}


def test_member_cookie_sees_tables_queries_sql_and_dashboards(site):
    base, rows = site
    for path in data_paths(rows):
        assert get(base, path, cookies=MEMBER).status_code == 200, path
    assert get(base, "/-/actor.json", cookies=MEMBER).json()["actor"]["role"] == "member"
    assert {t["name"] for t in get(base, f"/{DB}.json", cookies=MEMBER).json()["tables"]} >= set(TABLES)
    row = get(base, f"/{DB}/executed_obs_unit/{rows.evening}.json", cookies=MEMBER, params={"_shape": "array"}).json()
    assert row[0]["id"] == rows.evening


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(actor_cookie(github_actor("mallory", orgs=[])), id="not-in-the-org"),
        pytest.param(actor_cookie(github_actor("mallory", orgs=["other-org"])), id="other-org"),
        pytest.param(actor_cookie(github_actor("mallory", orgs=[], role="member")), id="role-smuggled-in-the-cookie"),
        pytest.param(actor_cookie({"id": "mallory", "gh_orgs": [ORG]}), id="not-a-github-actor"),
        pytest.param(actor_cookie(github_actor(), secret="another-secret-" + "x" * 32), id="signed-with-another-secret"),
        pytest.param(actor_cookie(github_actor(), expires_in=-10), id="expired"),
        pytest.param({"ds_actor": "garbage"}, id="garbage"),
    ],
)
def test_non_members_and_bad_cookies_are_refused(site, cookie):
    base, rows = site
    for path in data_paths(rows):
        assert get(base, path, cookies=cookie).status_code == 403, path


def test_script_token_reads_tables_and_queries_but_not_sql(site):
    base, rows = site
    for table in TABLES:
        response = get(base, f"/{DB}/{table}.json", headers=BEARER)
        assert response.status_code == 200 and response.json()["rows"], table
    assert get(base, f"/{DB}/tonights_observations.json", headers=BEARER).status_code == 200
    assert get(base, "/-/actor.json", headers=BEARER).json()["actor"] == {"id": "opsync-script", "role": "script"}
    assert get(base, f"/{DB}.json", headers=BEARER, params={"sql": "select 1"}).status_code == 403
    assert get(base, "/-/dashboards/sync", headers=BEARER).status_code == 403


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer",
        f"Bearer  {TOKEN}",
        f"bearer {TOKEN}",
        "Bearer wrong-token",
    ],
)
def test_wrong_tokens_are_refused_with_401(site, authorization):
    base, _ = site
    response = get(base, f"/{DB}/raw_data_file.json", headers={"Authorization": authorization})
    assert response.status_code == 401, authorization
    assert response.headers["www-authenticate"].startswith("Bearer")
    # even together with a member's cookie: a script with a stale token must fail loudly
    assert get(base, f"/{DB}/raw_data_file.json", headers={"Authorization": authorization}, cookies=MEMBER).status_code == 401


def test_write_sql_is_refused_for_everyone(site):
    base, _ = site
    for credentials in ({"cookies": MEMBER}, {"headers": BEARER}, {}):
        for sql in WRITES:
            response = get(base, f"/{DB}.json", params={"sql": sql}, **credentials)
            assert response.status_code in (400, 403), (credentials, sql, response.status_code)
        for path in (f"/{DB}", f"/{DB}/raw_data_file", f"/{DB}/tonights_observations"):
            response = httpx.post(f"{base}{path}", data={"sql": WRITES[0]}, timeout=10, **credentials)
            assert response.status_code == 403, (credentials, path)
    for sql in WRITES:  # the member may run SQL, but only read-only SELECTs
        assert get(base, f"/{DB}.json", params={"sql": sql}, cookies=MEMBER).status_code == 400, sql
    count = get(base, f"/{DB}.json", params={"sql": "select count(*) as n from raw_data_file", "_shape": "array"}, cookies=MEMBER).json()
    assert count == [{"n": 5}]


def test_tokens_ledger_and_internal_tables_are_never_visible(site):
    base, _ = site
    for credentials in ({"cookies": MEMBER}, {"headers": BEARER}):
        for table in NEVER_PUBLISHED:
            assert get(base, f"/{DB}/{table}.json", **credentials).status_code == 404, table
        assert get(base, f"/{DB}/publisher_state.json", **credentials).status_code == 403
        assert get(base, "/_internal.json", **credentials).status_code in (403, 404)
        assert "publisher_state" not in {t["name"] for t in get(base, f"/{DB}.json", **credentials).json()["tables"]}
    names = get(base, f"/{DB}.json", params={"sql": "select name from sqlite_master", "_shape": "array"}, cookies=MEMBER).json()
    assert not {row["name"] for row in names} & set(NEVER_PUBLISHED)


def test_no_secret_is_served(site):
    base, _ = site
    for path in ("/-/metadata.json", "/-/plugins.json", "/-/settings.json", "/-/databases.json", "/"):
        text = get(base, path, cookies=MEMBER).text
        for secret in (TOKEN, SECRET, GITHUB_ENV["OPSYNC_GITHUB_CLIENT_SECRET"]):
            assert secret not in text, path
    for path in (METADATA, served_metadata.ENGINE):
        for key in ("client_secret", "token"):
            for line in path.read_text().splitlines():
                if re.match(rf"\s*-?\s*{key}:", line):
                    assert "$env" in line, line


ROTATED = "test-script-token-" + "r" * 32  # a token the site used before rotating it: revoked
CALLERS = {  # kind of caller -> its credentials (cookies and headers)
    "anonymous": {},
    "wrong_token": {"headers": {"Authorization": "Bearer wrong-token-" + "w" * 32}},
    "revoked_token": {"headers": {"Authorization": f"Bearer {ROTATED}"}},
    "expired_cookie": {"cookies": actor_cookie(github_actor(), expires_in=-10)},
    "not_a_member": {"cookies": actor_cookie(github_actor("mallory", orgs=["other-org"]))},
    "script": {"headers": BEARER},  # right scope for tables and canned queries, wrong one for SQL
    "member": {"cookies": MEMBER},
}
RESOURCES = {
    "table": f"/{DB}/raw_data_file.json",
    "row": f"/{DB}/executed_obs_unit/{{evening}}.json",
    "canned_query": f"/{DB}/tonights_observations.json",
    "sql": f"/{DB}.json?sql=select+count(*)+from+raw_data_file",
    "dashboard": "/-/dashboards/sync",
    "token_table": f"/{DB}/api_token.json",
    "sql_on_tokens": f"/{DB}.json?sql=select+*+from+api_token",
    "write_sql": f"/{DB}.json?sql=delete+from+raw_data_file",
}
REFUSED = [403, 403, 403, 403, 403, 404, 403, 403]  # the token table does not exist for anyone: 404 before access
EXPECTED = {  # status per caller, in RESOURCES order; 400: Datasette refuses a statement that is not a read
    "anonymous": REFUSED,
    "wrong_token": [401] * 8,
    "revoked_token": [401] * 8,
    "expired_cookie": REFUSED,
    "not_a_member": REFUSED,
    "script": [200, 200, 200, 403, 403, 404, 403, 400],
    "member": [200, 200, 200, 200, 200, 404, 400, 400],
}


@pytest.mark.parametrize("caller", EXPECTED)
def test_access_matrix(site, caller):
    """Each kind of caller against each kind of resource, in one table: who may read what, and nobody writes."""
    base, rows = site
    got = [get(base, path.format(evening=rows.evening), **CALLERS[caller]).status_code for path in RESOURCES.values()]
    assert dict(zip(RESOURCES, got, strict=True)) == dict(zip(RESOURCES, EXPECTED[caller], strict=True))


def test_a_domain_without_the_engines_settings_gets_access_control_sql_limits_and_the_sync_dashboard(tmp_path):
    """A domain's datasette.yml with no ``plugins:`` and no ``allow``: the engine's are merged in when Datasette starts."""
    domain = tmp_path / "domain.yml"
    domain.write_text(
        yaml.safe_dump({"title": "Bare domain", "databases": {DB: {"tables": {"instrument": {"title": "Bare instruments"}}}}})
    )
    fill_read_model(tmp_path / "opsync.db")
    with serve_datasette(tmp_path, tmp_path / "opsync.db", env=GITHUB_ENV, metadata=domain) as base:
        assert "Bare domain" in get(base, "/").text
        for path in (f"/{DB}.json", f"/{DB}/instrument.json", f"/{DB}.json?sql=select+1", "/-/dashboards/sync"):
            assert get(base, path).status_code == 403, path  # anonymous, production mode
        assert get(base, f"/{DB}/instrument.json", headers=BEARER).status_code == 200
        assert get(base, f"/{DB}.json?sql=select+1", headers=BEARER).status_code == 403  # scripts: no SQL
        assert get(base, f"/{DB}/instrument", cookies=MEMBER).text.count("Bare instruments") >= 1
        board = get(base, "/-/dashboards/sync", cookies=MEMBER)
        assert board.status_code == 200 and 'id="chart-buffer-depth"' in board.text
        refused = get(base, f"/{DB}.json", params={"sql": "select load_extension('x')"}, cookies=MEMBER)
        assert refused.status_code == 400 and "load_extension" in refused.text
        served = get(base, "/-/metadata.json", cookies=MEMBER).json()
        assert served["plugins"]["opsync-sql-limits"] == {"sql_slots": 2, "sql_wait_s": 5}
        assert served["databases"][DB]["allow"] == {"role": ["member", "script", "local"]}


# --- in-process: the GitHub sign-in flow, public mode, startup checks ----------------------------


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory):
    """The repository's plugins but the publisher, registered once; unregistered afterwards."""
    path = tmp_path_factory.mktemp("access-plugins")
    for plugin in (REPO / "datasette/plugins").glob("*.py"):
        if plugin.name != "opsync_publisher.py":
            shutil.copy(plugin, path)
    yield path
    for plugin in path.glob("*.py"):
        if pm.get_plugin(plugin.name) is not None:
            pm.unregister(name=plugin.name)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("access-model") / "opsync.db"
    fill_read_model(path)
    return path


@pytest.fixture
def github_env(monkeypatch):
    for name, value in GITHUB_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPSYNC_GITHUB_TEAM", raising=False)
    return monkeypatch


def in_process(model: Path, plugins_dir: Path) -> Datasette:
    return Datasette([str(model)], metadata=served_metadata.merged(METADATA), plugins_dir=str(plugins_dir), secret=SECRET)


async def requests(ds: Datasette, calls):
    await ds.invoke_startup()
    transport = httpx.ASGITransport(app=ds.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return [await call(client) for call in calls]


def run(ds: Datasette, *calls) -> list[httpx.Response]:
    return asyncio.run(requests(ds, calls))


def set_cookies(response: httpx.Response) -> dict[str, SimpleCookie]:
    found = {}
    for header in response.headers.get_list("set-cookie"):
        jar = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            found[name] = morsel
    return found


def start_sign_in(ds: Datasette) -> tuple[str, str]:
    """GET /-/github-auth-start: (state sent to GitHub, state cookie)."""
    (response,) = run(ds, lambda c: c.get("/-/github-auth-start"))
    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert (location.scheme, location.netloc, location.path) == ("https", "github.com", "/login/oauth/authorize")
    query = parse_qs(location.query)
    assert query["client_id"] == ["client-id-123"] and query["scope"] == ["read:org"]
    cookie = set_cookies(response)["opsync_gh_state"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/-/github-auth-callback"
    assert len(query["state"][0]) >= 43  # 256 bits, url-safe base64
    return query["state"][0], cookie.value


def mock_github(httpx_mock, login: str = "alice", org_state: str | None = "active", teams: dict | None = None) -> None:
    httpx_mock.add_response(
        method="POST", url="https://github.com/login/oauth/access_token", text="access_token=gho_test&scope=read%3Aorg&token_type=bearer"
    )
    httpx_mock.add_response(
        method="GET", url="https://api.github.com/user", json={"id": 4242, "login": login, "name": login.title(), "email": None}
    )
    if org_state is None:
        httpx_mock.add_response(
            method="GET", url=f"https://api.github.com/orgs/{ORG}/memberships/{login}", status_code=404, json={"message": "Not Found"}
        )
    else:
        httpx_mock.add_response(
            method="GET", url=f"https://api.github.com/orgs/{ORG}/memberships/{login}", json={"state": org_state, "role": "member"}
        )
    for team, state in (teams or {}).items():
        org, slug = team.split("/")
        httpx_mock.add_response(method="GET", url=f"https://api.github.com/orgs/{org}/teams/{slug}", json={"id": 77})
        httpx_mock.add_response(
            method="GET",
            url=f"https://api.github.com/teams/77/memberships/{login}",
            status_code=200 if state else 404,
            json={"state": state} if state else {},
        )


def callback(ds: Datasette, state: str | None, cookie: str | None, then: str | None = None) -> list[httpx.Response]:
    params = {"code": "github-code"} | ({"state": state} if state is not None else {})
    cookies = {"opsync_gh_state": cookie} if cookie is not None else {}

    async def sign_in(client):
        client.cookies.clear()
        return await client.get("/-/github-auth-callback", params=params, cookies=cookies)

    calls = [sign_in]
    if then:

        async def follow(client):
            return await client.get(then)

        calls.append(follow)
    return run(ds, *calls)


def test_org_member_signs_in_and_reads(github_env, model, plugins_dir, httpx_mock):
    ds = in_process(model, plugins_dir)
    state, cookie = start_sign_in(ds)
    mock_github(httpx_mock)
    signed_in, table = callback(ds, state, cookie, then=f"/{DB}/raw_data_file.json")
    assert signed_in.status_code == 302 and signed_in.headers["location"] == "/"
    cookies = set_cookies(signed_in)
    actor = ds.unsign(cookies["ds_actor"].value, "actor")["a"]
    assert actor["gh_login"] == "alice" and actor["gh_orgs"] == [ORG] and "role" not in actor
    assert cookies["opsync_gh_state"]["max-age"] == "0"  # the nonce is single-use
    assert table.status_code == 200 and table.json()["rows"]
    exchange = httpx_mock.get_request(url="https://github.com/login/oauth/access_token")
    assert b"client_secret=client-secret-456" in exchange.content and b"code=github-code" in exchange.content


@pytest.mark.parametrize("org_state", [None, "pending"])
def test_non_member_gets_no_cookie(github_env, model, plugins_dir, httpx_mock, org_state):
    ds = in_process(model, plugins_dir)
    state, cookie = start_sign_in(ds)
    mock_github(httpx_mock, login="mallory", org_state=org_state)
    (response,) = callback(ds, state, cookie)
    assert response.status_code == 403 and "mallory is not a member" in response.text
    assert "ds_actor" not in set_cookies(response)


def test_team_restriction(github_env, model, plugins_dir, httpx_mock):
    github_env.setenv("OPSYNC_GITHUB_TEAM", TEAM)
    ds = in_process(model, plugins_dir)
    state, cookie = start_sign_in(ds)
    mock_github(httpx_mock, teams={TEAM: "active"})
    signed_in, table = callback(ds, state, cookie, then=f"/{DB}/raw_data_file.json")
    assert signed_in.status_code == 302 and table.status_code == 200
    assert ds.unsign(set_cookies(signed_in)["ds_actor"].value, "actor")["a"]["gh_teams"] == [TEAM]

    httpx_mock.reset()
    state, cookie = start_sign_in(ds)
    mock_github(httpx_mock, login="bob", teams={TEAM: None})  # in the org, not in the team
    (response,) = callback(ds, state, cookie)
    assert response.status_code == 403 and f"team {TEAM}" in response.text
    assert "ds_actor" not in set_cookies(response)
    # an org member's cookie gives nothing once the team is required
    (table,) = run(ds, lambda c: c.get(f"/{DB}/raw_data_file.json", cookies=MEMBER))
    assert table.status_code == 403


def other_state_cookie(nonce: str, age_s: int = 0, secret: str = SECRET) -> str:
    return Datasette([], secret=secret).sign({"n": nonce, "t": int(time.time()) - age_s}, "opsync-github-state")


@pytest.mark.parametrize("case", ["no-state", "no-cookie", "mismatch", "empty", "other-secret", "expired", "garbage"])
def test_bad_or_missing_state_is_refused_before_calling_github(github_env, model, plugins_dir, httpx_mock, case):
    ds = in_process(model, plugins_dir)
    state, cookie = start_sign_in(ds)
    sent, kept = {
        "no-state": (None, cookie),
        "no-cookie": (state, None),
        "mismatch": (state[:-1] + ("A" if state[-1] != "A" else "B"), cookie),
        "empty": ("", other_state_cookie("")),
        "other-secret": (state, other_state_cookie(state, secret="another-secret-" + "x" * 32)),
        "expired": (state, other_state_cookie(state, age_s=601)),
        "garbage": (state, "not-a-signed-value"),
    }[case]
    (response,) = callback(ds, sent, kept)
    assert response.status_code == 403 and "state" in response.text
    assert "ds_actor" not in set_cookies(response)
    assert httpx_mock.get_requests() == []  # GitHub never asked


def test_state_from_another_browser_is_refused(github_env, model, plugins_dir, httpx_mock):
    """Login CSRF: the attacker's own state and code, replayed in the victim's browser (with its own state cookie)."""
    ds = in_process(model, plugins_dir)
    attacker_state, _ = start_sign_in(ds)
    _, victim_cookie = start_sign_in(ds)
    (response,) = callback(ds, attacker_state, victim_cookie)
    assert response.status_code == 403 and httpx_mock.get_requests() == []


def test_github_sign_in_off_when_not_configured(github_env, model, plugins_dir):
    for name in ("OPSYNC_GITHUB_CLIENT_ID", "OPSYNC_GITHUB_CLIENT_SECRET", "OPSYNC_GITHUB_ORG"):
        github_env.delenv(name)
    ds = in_process(model, plugins_dir)
    start, back, table = run(
        ds,
        lambda c: c.get("/-/github-auth-start"),
        lambda c: c.get("/-/github-auth-callback", params={"code": "x", "state": "y"}),
        lambda c: c.get(f"/{DB}/raw_data_file.json", cookies=MEMBER),
    )
    assert start.status_code == 404 and back.status_code == 404 and "not configured" in start.text
    assert table.status_code == 403  # no org configured: no GitHub actor is a member


def test_public_mode_lets_anonymous_read_and_run_sql_but_not_write(github_env, model, plugins_dir):
    github_env.setenv("OPSYNC_DATASETTE_PUBLIC", "true")
    ds = in_process(model, plugins_dir)
    table, sql, dashboard, write, post, bad_token, actor = run(
        ds,
        lambda c: c.get(f"/{DB}/raw_data_file.json"),
        lambda c: c.get(f"/{DB}.json", params={"sql": "select count(*) from raw_data_file"}),
        lambda c: c.get("/-/dashboards/sync"),
        lambda c: c.get(f"/{DB}.json", params={"sql": WRITES[0]}),
        lambda c: c.post(f"/{DB}", data={"sql": WRITES[0]}),
        lambda c: c.get(f"/{DB}/raw_data_file.json", headers={"Authorization": "Bearer wrong"}),
        lambda c: c.get("/-/actor.json"),
    )
    assert table.status_code == sql.status_code == dashboard.status_code == 200
    assert write.status_code == 400 and post.status_code == 403 and bad_token.status_code == 401
    assert actor.json()["actor"]["role"] == "local"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"OPSYNC_DATASETTE_TOKEN": "short"}, "OPSYNC_DATASETTE_TOKEN"),
        ({"OPSYNC_DATASETTE_TOKEN": ""}, "OPSYNC_DATASETTE_TOKEN"),
        ({"OPSYNC_GITHUB_ORG": ""}, "OPSYNC_GITHUB_ORG"),
        ({"OPSYNC_GITHUB_CLIENT_SECRET": ""}, "OPSYNC_GITHUB_CLIENT_SECRET"),
        ({"OPSYNC_DATASETTE_PUBLIC": "maybe"}, "OPSYNC_DATASETTE_PUBLIC"),
    ],
)
def test_startup_refuses_weak_settings(github_env, model, plugins_dir, env, message):
    for name, value in env.items():
        github_env.setenv(name, value)
    ds = in_process(model, plugins_dir)
    with pytest.raises(ValueError, match=message):
        asyncio.run(ds.invoke_startup())


def test_startup_refuses_a_short_datasette_secret(github_env, model, plugins_dir):
    ds = Datasette([str(model)], metadata=served_metadata.merged(METADATA), plugins_dir=str(plugins_dir), secret="change-me")
    with pytest.raises(ValueError, match="DATASETTE_SECRET"):
        asyncio.run(ds.invoke_startup())


def test_unset_token_disables_tokens(github_env, model, plugins_dir):
    github_env.delenv("OPSYNC_DATASETTE_TOKEN")
    ds = in_process(model, plugins_dir)
    responses = run(
        ds,
        *[
            lambda c, h=h: c.get(f"/{DB}/raw_data_file.json", headers={"Authorization": h})
            for h in ("Bearer ", "Bearer None", "Bearer null")
        ],
    )
    assert [r.status_code for r in responses] == [401, 401, 401]
