"""Who may call what: every route of the ingest API against every kind of caller, over real HTTP.

The routes come from ``app.routes``, so a new route fails here until it is given an entry in
``SPECS`` (its scope and a request) or is added, deliberately, to ``PUBLIC``. Tokens are checked
at the site against the local replica; the last tests stop the primary or the replica and
revoke a token to show what the cache does then.
"""

import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import Engine, create_engine, select

from ingest_api.app import app
from ingest_api.deps import Caller
from opsync.auth import TOKEN_PREFIX, create_token, hash_token, revoke_token
from opsync.schema import ApiToken

T = "executed_obs_unit"  # a critical (buffered) table: granted writes are answered without the primary
OTHER = "raw_data_file"

# Public by design: liveness/readiness for supervisors, Prometheus, and FastAPI's documentation pages
# (/docs needs /openapi.json and /docs/oauth2-redirect; /redoc is FastAPI's second viewer of the same).
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
}

ROUTES = sorted((method, route.path) for route in app.routes for method in (route.methods or set()) - {"HEAD"})


SHA = "ab" * 32


def observation_row(client: httpx.Client, headers: dict, obs: dict) -> str:
    created = client.post(f"/v1/records/{T}", json=obs, headers=headers)
    assert created.status_code == 202, created.text
    return created.json()["ids"][0]


def file_row(client: httpx.Client, headers: dict, obs: dict) -> str:
    """A raw data file (deletable, unlike observations) of a new observation."""
    steps = [
        {"table": T, "ref": "obs", "values": obs},
        {"table": OTHER, "values": {"executed_obs_unit_id": {"$ref": "obs"}, "path": f"/data/{uuid.uuid4()}.fits",
                                    "size_bytes": 10, "checksum_sha256": SHA, "file_type": "fits"}},
    ]
    created = client.post("/v1/transactions", json={"steps": steps}, headers=headers)
    assert created.status_code == 202, created.text
    return created.json()["ids"][1]


@dataclass(frozen=True)
class Spec:
    """What a route requires (``None``: any valid token) and a request to it, given an observation and a row id.

    ``make_row`` creates the row a granted request changes (a random id would buffer a change doomed
    to be dead-lettered); refused requests get a random id.
    """

    scope: str | None
    request: Callable[[dict, str], tuple[str, dict | None]]
    make_row: Callable[[httpx.Client, dict, dict], str] | None = None
    stream: bool = False


def patch_body(observation: dict) -> dict:
    end = datetime.fromisoformat(observation["start_time"]) + timedelta(minutes=1)
    return {"status": "completed", "end_time": end.isoformat()}


SPECS: dict[tuple[str, str], Spec] = {
    ("POST", "/v1/records/{table}"): Spec(f"write:{T}", lambda obs, _: (f"/v1/records/{T}", obs)),
    ("POST", "/v1/transactions"): Spec(f"write:{T}", lambda obs, _: ("/v1/transactions", {"steps": [{"table": T, "values": obs}]})),
    ("PATCH", "/v1/records/{table}/{row_id}"): Spec(
        f"write:{T}", lambda obs, row: (f"/v1/records/{T}/{row}", patch_body(obs)), make_row=observation_row
    ),
    ("DELETE", "/v1/records/{table}/{row_id}"): Spec(
        f"write:{OTHER}", lambda obs, row: (f"/v1/records/{OTHER}/{row}", None), make_row=file_row
    ),
    ("GET", "/v1/records/{table}/{row_id}"): Spec(f"read:{T}", lambda obs, row: (f"/v1/records/{T}/{row}", None)),
    ("GET", "/v1/records/{table}"): Spec(f"read:{T}", lambda obs, _: (f"/v1/records/{T}?limit=1", None)),
    # Transaction states and their event stream carry no record data: any valid token may follow them.
    ("GET", "/v1/transactions/{txn_id}"): Spec(None, lambda obs, _: (f"/v1/transactions/{uuid.uuid4()}", None)),
    ("GET", "/v1/transactions"): Spec(None, lambda obs, _: (f"/v1/transactions?ids={uuid.uuid4()}", None)),
    ("GET", "/v1/events"): Spec(None, lambda obs, _: ("/v1/events", None), stream=True),
}
SCOPES = sorted({spec.scope for spec in SPECS.values() if spec.scope})


def near_misses(scope: str) -> list[str]:
    """Scopes that share the verb or the table of ``scope`` but are not it: exactness is what is tested."""
    verb, _, table = scope.partition(":")
    other_verb = {"read": "write", "write": "read"}[verb]
    other_table = OTHER if table != OTHER else T
    return [f"{other_verb}:{table}", f"{verb}:{other_table}"]


REFUSED = {  # case -> (status, words the detail must contain)
    "anonymous": (401, "missing"),
    "malformed": (401, "malformed"),
    "unknown_token": (401, "unknown token"),
    "expired": (401, "expired"),
    "revoked": (401, "revoked"),
    "wrong_scope": (403, "lacks scope"),
}
GRANTED = ("right_scope", "admin")


def cases(route: tuple[str, str]) -> list[str]:
    """Routes open to any valid token have no wrong scope: an unrelated one must be accepted instead."""
    spec = SPECS.get(route)
    if spec is not None and spec.scope is None:
        return [case for case in REFUSED if case != "wrong_scope"] + ["unrelated_scope", "admin"]
    return [*REFUSED, *GRANTED]


MATRIX = [(route, case) for route in ROUTES if route not in PUBLIC for case in cases(route)]


def on_replica(replica: Engine, name: str, done: Callable[[object], bool], timeout: float = 15) -> None:
    """Wait until the replica's copy of token ``name`` satisfies ``done`` (the API checks tokens there)."""
    deadline = time.monotonic() + timeout
    while True:
        with replica.connect() as conn:
            row = conn.execute(select(ApiToken.revoked_at).where(ApiToken.name == name)).first()
        if row is not None and done(row):
            return
        assert time.monotonic() < deadline, f"replica never showed token {name!r} as expected"
        time.sleep(0.05)


def issue(primary: Engine, replica: Engine, scopes: list[str], expires_at: datetime | None = None) -> tuple[str, str]:
    """(name, token) of a new token the replica already knows."""
    name = f"matrix-{uuid.uuid4()}"
    token = create_token(primary, name, scopes, expires_at)
    on_replica(replica, name, lambda row: True)
    return name, token


@pytest.fixture(scope="module")
def tokens(migrated) -> dict[str, str]:
    """One token per kind of caller; expired and revoked ones carry ``admin``, so only that refuses them."""
    primary, replica = create_engine(migrated.primary.url()), create_engine(migrated.replica.url())
    try:
        made = {"admin": issue(primary, replica, ["admin"])[1], "unrelated": issue(primary, replica, [f"read:{OTHER}"])[1]}
        for scope in SCOPES:
            made[scope] = issue(primary, replica, [scope])[1]
            made[f"not {scope}"] = issue(primary, replica, near_misses(scope))[1]
        revoked_name, made["revoked"] = issue(primary, replica, ["admin"])
        assert revoke_token(primary, revoked_name)
        on_replica(replica, revoked_name, lambda row: row.revoked_at is not None)
        expires_at = datetime.now(UTC) + timedelta(seconds=1)
        made["expired"] = issue(primary, replica, ["admin"], expires_at)[1]
        time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.1)
        return made
    finally:
        primary.dispose()
        replica.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def send(client: httpx.Client, method: str, path: str, body: dict | None, headers: dict, stream: bool = False) -> httpx.Response:
    """An event stream is opened, its status read and closed at once; its body only when refused."""
    if not stream:
        return client.request(method, path, json=body, headers=headers)
    with client.stream(method, path, headers=headers) as response:
        if response.status_code != 200:
            response.read()
        return response


def test_every_route_is_public_or_in_the_matrix():
    """A route nobody classified fails here (and in the matrix), so it cannot ship unauthenticated by accident."""
    assert set(SPECS) <= set(ROUTES), "SPECS names routes the app no longer has"
    assert PUBLIC <= set(ROUTES), "PUBLIC names routes the app no longer has"
    assert set(ROUTES) - PUBLIC == set(SPECS), "classify each route: PUBLIC by design, or an entry in SPECS"


def needs_token(dependant) -> bool:
    """The route depends on the bearer scheme (``Caller``, or the write routes' ``WriteAccess``, which is one)."""
    return any(isinstance(dep.call, Caller) or needs_token(dep) for dep in dependant.dependencies)


def test_exactly_the_public_routes_take_no_token():
    """Statically: each non-public route depends on the bearer header, and no public one does; the matrix below shows each checks it."""
    unauthenticated = {
        (method, route.path)
        for route in app.routes
        for method in (route.methods or set()) - {"HEAD"}
        if not (isinstance(route, APIRoute) and needs_token(route.dependant))
    }
    assert unauthenticated == PUBLIC


@pytest.mark.parametrize("route", sorted(PUBLIC), ids=" ".join)
def test_public_route_answers_without_a_token(live_api, route):
    method, path = route
    response = httpx.request(method, live_api + path, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route, case", MATRIX, ids=[f"{m} {p} {c}" for (m, p), c in MATRIX])
def test_auth_matrix(live_api, tokens, observation, route, case):
    method, _ = route
    spec = SPECS.get(route)
    assert spec is not None, f"{route} has no entry in SPECS: say which scope it needs"
    obs = observation()
    with httpx.Client(base_url=live_api, timeout=10) as client:
        granted = case not in REFUSED
        target = str(uuid.uuid4())
        if granted and spec.make_row:
            target = spec.make_row(client, bearer(tokens["admin"]), obs)
        token = {
            "unknown_token": TOKEN_PREFIX + secrets.token_urlsafe(32),
            "expired": tokens["expired"],
            "revoked": tokens["revoked"],
            "wrong_scope": tokens.get(f"not {spec.scope}"),
            "unrelated_scope": tokens["unrelated"],
            "right_scope": tokens.get(spec.scope),
            "admin": tokens["admin"],
        }.get(case)
        headers = bearer(token) if token else {}
        path, body = spec.request(obs, target)
        if case == "malformed":  # a valid admin token under the wrong scheme, no token, or no scheme
            for header in (f"Basic {tokens['admin']}", "Bearer", f"Bearer:{tokens['admin']}", tokens["admin"]):
                response = send(client, method, path, body, {"Authorization": header}, spec.stream)
                assert response.status_code == 401, (header, response.text)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            return
        response = send(client, method, path, body, headers, spec.stream)
    if granted:
        assert response.status_code not in (401, 403), response.text
        assert response.is_success or response.status_code == 404, response.text
        if spec.stream:
            assert response.headers["content-type"].startswith("text/event-stream")
        return
    status, words = REFUSED[case]
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_writes_are_accepted_while_the_primary_is_down(live_api, pg, primary_engine, replica_engine, observation):
    """The token (never used before, so not cached) is checked on the replica; the record goes to the buffer."""
    _, token = issue(primary_engine, replica_engine, [f"write:{T}", f"read:{T}"])
    primary_engine.dispose()
    pg.primary.stop()
    try:
        with httpx.Client(base_url=live_api, headers=bearer(token), timeout=10) as client:
            for _ in range(3):
                response = client.post(f"/v1/records/{T}", json=observation())
                assert response.status_code == 202, response.text
                assert response.json()["state"] == "accepted"
            assert client.get(response.json()["status_url"]).json()["state"] == "accepted"
            unknown = client.post(f"/v1/records/{T}", json=observation(), headers=bearer(TOKEN_PREFIX + "x" * 43))
            assert unknown.status_code == 401
    finally:
        pg.primary.start()
        pg.replica.wait_streaming()


@pytest.fixture
def token_cache_ttl(site_env, monkeypatch) -> float:
    """A short token cache in the API (set before its verifier is built on the first request)."""
    from opsync.config import get_settings

    ttl = 1.0
    monkeypatch.setenv("OPSYNC_TOKEN_CACHE_TTL_S", str(ttl))
    get_settings.cache_clear()
    return ttl


def test_known_tokens_keep_working_through_a_replica_restart(
    token_cache_ttl, live_api, pg, primary_engine, replica_engine, observation, caplog
):
    """Known-good tokens are served from the cache while the replica is down; unknown ones get 503, uncached."""
    caplog.set_level("DEBUG")
    known_name, known = issue(primary_engine, replica_engine, [f"write:{T}"])
    _, unseen = issue(primary_engine, replica_engine, [f"write:{T}"])
    with httpx.Client(base_url=live_api, timeout=10) as client:
        assert client.post(f"/v1/records/{T}", json=observation(), headers=bearer(known)).status_code == 202
        replica_engine.dispose()
        pg.replica.stop()
        try:
            time.sleep(token_cache_ttl + 0.2)  # the cached entry is due for a re-check, which fails
            for _ in range(2):
                response = client.post(f"/v1/records/{T}", json=observation(), headers=bearer(known))
                assert response.status_code == 202, response.text
                refused = client.post(f"/v1/records/{T}", json=observation(), headers=bearer(unseen))
                assert refused.status_code == 503, refused.text  # cannot tell: not "unknown", and retryable
                assert "Retry-After" in refused.headers
        finally:
            pg.replica.start()
            pg.replica.wait_streaming()
        deadline = time.monotonic() + 15
        while (status := client.post(f"/v1/records/{T}", json=observation(), headers=bearer(unseen)).status_code) == 503:
            assert time.monotonic() < deadline, "the token was never accepted after the replica came back"
            time.sleep(0.1)
        assert status == 202
    assert f"trusting cached token {known_name!r}" in caplog.text  # the fallback is visible in the log ...
    assert known not in caplog.text and unseen not in caplog.text  # ... the tokens never are


def test_revocation_is_honoured_once_replayed_and_the_cache_expired(
    token_cache_ttl, live_api, primary_engine, replica_engine, observation
):
    name, token = issue(primary_engine, replica_engine, [f"write:{T}"])
    with httpx.Client(base_url=live_api, headers=bearer(token), timeout=10) as client:
        assert client.post(f"/v1/records/{T}", json=observation()).status_code == 202
        validated = time.monotonic()
        assert revoke_token(primary_engine, name)
        cached = client.post(f"/v1/records/{T}", json=observation()).status_code
        if time.monotonic() - validated < token_cache_ttl:
            assert cached == 202  # within the TTL the cache still answers: revocation is not instant, by design
        on_replica(replica_engine, name, lambda row: row.revoked_at is not None)
        time.sleep(token_cache_ttl + 0.1)
        response = client.post(f"/v1/records/{T}", json=observation())
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_tokens_are_stored_hashed_and_random(primary_engine, replica_engine):
    name, token = issue(primary_engine, replica_engine, [f"read:{T}"])
    assert token.startswith(TOKEN_PREFIX) and len(token.removeprefix(TOKEN_PREFIX)) >= 43  # 32 bytes, base64url
    with primary_engine.connect() as conn:
        row = conn.execute(select(ApiToken.__table__).where(ApiToken.name == name)).one()._mapping
    assert row["token_sha256"] == hash_token(token)
    assert token not in repr(dict(row))
