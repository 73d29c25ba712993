"""Who may call what: every route of the ingest API against every kind of caller, over real HTTP.

The routes come from ``app.routes``, so a new route fails here until it is given an entry in
``SPECS`` (its scope and a request) or is added, deliberately, to ``PUBLIC``. Transaction states
and events are seen only by tokens that may read or write every table a transaction involves;
to any other token such a transaction does not exist (the answer for an unknown id). Then: what
event streams carry and when they close, and that backpressure answers only authorised writers.
Tokens are checked at the site against the local replica; the last tests stop the primary or the
replica and revoke a token to show what the cache does then.
"""

import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import Engine, create_engine, func, select, update

from ingest_api.app import app
from ingest_api.deps import Caller
from opsync.auth import TOKEN_PREFIX, create_token, hash_token, revoke_token
from opsync.schema import ApiToken
from tests.records import observation_with_file, raw_file
from tests.sse_events import Events

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


def observation_row(client: httpx.Client, headers: dict, obs: dict) -> str:
    created = client.post(f"/v1/records/{T}", json=obs, headers=headers)
    assert created.status_code == 202, created.text
    return created.json()["ids"][0]


def file_row(client: httpx.Client, headers: dict, obs: dict) -> str:
    """A raw data file (deletable, unlike observations) of a new observation."""
    created = client.post("/v1/transactions", json={"steps": observation_with_file(obs)}, headers=headers)
    assert created.status_code == 202, created.text
    return created.json()["ids"][1]


def txn_of(client: httpx.Client, headers: dict, obs: dict) -> str:
    """A buffered transaction of one table (``T``): its id."""
    created = client.post(f"/v1/records/{T}", json=obs, headers=headers)
    assert created.status_code == 202, created.text
    return created.json()["txn_id"]


@dataclass(frozen=True)
class Spec:
    """What a route requires and a request to it, given an observation and a row (or transaction) id.

    ``make_row`` creates the row a granted request changes (a random id would buffer a change doomed
    to be dead-lettered); refused requests get a random id. A ``hidden`` route's target is refused by
    being unknown (``404``, or ``null`` in a list), never ``403``, so that no token learns it exists; its
    target is always made, and ``read:`` or ``write:`` on the table grants it.
    """

    scope: str
    request: Callable[[dict, str], tuple[str, dict | None]]
    make_row: Callable[[httpx.Client, dict, dict], str] | None = None
    stream: bool = False
    hidden: bool = False


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
    # Transaction states (a failure reason quotes row values) and their events: for tokens that may see the tables.
    ("GET", "/v1/transactions/{txn_id}"): Spec(
        f"read:{T}", lambda obs, txn: (f"/v1/transactions/{txn}", None), make_row=txn_of, hidden=True
    ),
    ("GET", "/v1/transactions"): Spec(f"read:{T}", lambda obs, txn: (f"/v1/transactions?ids={txn}", None), make_row=txn_of, hidden=True),
    ("GET", "/v1/events"): Spec(
        f"read:{T}", lambda obs, txn: (f"/v1/events?txn_id={txn}", None), make_row=txn_of, stream=True, hidden=True
    ),
}
SCOPES = sorted({spec.scope for spec in SPECS.values()} | {f"write:{T}"})


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
UNAUTHENTICATED = [case for case in REFUSED if REFUSED[case][0] == 401]


def cases(route: tuple[str, str]) -> list[str]:
    """A hidden route's target is refused to a token of another table (as unknown), granted to ``read:`` and ``write:``."""
    spec = SPECS.get(route)
    if spec is not None and spec.hidden:
        return [*UNAUTHENTICATED, "other_table", "right_scope", "write_scope", "admin"]
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
        granted = case not in REFUSED and case != "other_table"
        target = str(uuid.uuid4())
        if (granted or spec.hidden) and spec.make_row:
            target = spec.make_row(client, bearer(tokens["admin"]), obs)
        token = {
            "unknown_token": TOKEN_PREFIX + secrets.token_urlsafe(32),
            "expired": tokens["expired"],
            "revoked": tokens["revoked"],
            "wrong_scope": tokens.get(f"not {spec.scope}"),
            "other_table": tokens["unrelated"],
            "right_scope": tokens.get(spec.scope),
            "write_scope": tokens.get(f"write:{T}"),
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
        if case == "other_table":  # exactly the answer for a transaction that does not exist
            unknown = str(uuid.uuid4())
            path_of_unknown, body = spec.request(obs, unknown)
            expected = send(client, method, path_of_unknown, body, headers, spec.stream)
            assert response.status_code == expected.status_code, response.text
            assert response.text.replace(target, unknown) == expected.text
            assert response.status_code == 404 or response.json() == {target: None}
            return
    if granted:
        assert response.status_code not in (401, 403), response.text
        assert response.is_success or (response.status_code == 404 and not spec.hidden), response.text
        if spec.stream:
            assert response.headers["content-type"].startswith("text/event-stream")
        elif spec.hidden:
            status = response.json()[target] if "?" in path else response.json()
            assert status["state"] == "accepted", response.text
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


def test_revocation_is_honoured_once_replayed_and_the_cache_expired(token_cache_ttl, live_api, primary_engine, replica_engine, observation):
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


# --- transaction states and event streams, by the tables a transaction involves -----------------


def configure(monkeypatch, **settings) -> None:
    """Change ``OPSYNC_*`` settings of the running app (``get_settings`` is cached)."""
    from opsync.config import get_settings

    for name, value in settings.items():
        monkeypatch.setenv(f"OPSYNC_{name.upper()}", str(value))
    get_settings.cache_clear()


def obs_step(obs: dict, ref: str | None = None) -> dict:
    return {"table": T, "values": obs} | ({"ref": ref} if ref else {})


def file_step(observation_id) -> dict:
    """A raw data file of ``observation_id`` (an id, or a ``$ref``); a random id fails at the primary."""
    return {"table": OTHER, "values": raw_file(observation_id)}


def submit(client: httpx.Client, token: str, *steps: dict) -> dict:
    created = client.post("/v1/transactions", json={"steps": list(steps)}, headers=bearer(token))
    assert created.status_code == 202, created.text
    return created.json()


def changes_until(events: Events, txn_id: str) -> list[dict]:
    """The state changes up to and including the first of ``txn_id``."""
    changes = []
    while not changes or changes[-1]["txn_id"] != txn_id:
        event = events.next()
        assert event is not None, "the stream ended"
        if event[0] is None:
            changes.append(event[1])
    return changes


def following(client: httpx.Client, token: str, stack: ExitStack) -> Events:
    """A stream of all the token may see, once subscribed: nothing published after this returns is missed."""
    events = Events(stack.enter_context(client.stream("GET", "/v1/events", headers=bearer(token))))
    assert events.next() == ("ready", {"following": "all"})
    return events


@pytest.mark.timeout(120)
def test_streams_carry_only_the_transactions_their_token_may_see(own_redis, live_api, tokens, observation, primary_engine, monkeypatch):
    """Through the real enqueue (its event names the tables) and the real drain (its events do not: the
    stream reads the status records). Each stream reads until a transaction written last for it, so
    whatever it was not shown before it, it is never shown."""
    from ingest_api.deps import get_buffer
    from opsync import drain

    configure(monkeypatch, events_keepalive_s=1)
    admin = tokens["admin"]
    with httpx.Client(base_url=live_api, timeout=10) as client, ExitStack() as stack:
        streams = {"mine": following(client, tokens[f"read:{T}"], stack), "admin": following(client, admin, stack)}
        missing = str(uuid.uuid4())
        lone_file = submit(client, admin, file_step(missing))  # OTHER alone; fails: no such observation
        both = submit(client, admin, obs_step(observation(), "obs"), file_step({"$ref": "obs"}))
        lone_obs = submit(client, admin, obs_step(observation()))
        file_of_obs = submit(client, admin, file_step(lone_obs["ids"][0]))
        streams["theirs"] = following(client, tokens["unrelated"], stack)  # read:OTHER; saw none of the enqueues
        summary = drain.drain(get_buffer(), primary_engine)
        assert (summary.applied, summary.dead_lettered) == (3, 1)
        last_mine = submit(client, admin, obs_step(observation()))
        last_theirs = submit(client, admin, file_step(lone_obs["ids"][0]))
        seen = {
            "mine": changes_until(streams["mine"], last_mine["txn_id"]),
            "theirs": changes_until(streams["theirs"], last_theirs["txn_id"]),
            "admin": changes_until(streams["admin"], last_theirs["txn_id"]),
        }
    states = {name: {(change["txn_id"], change["state"]) for change in changes} for name, changes in seen.items()}
    assert states["mine"] == {(lone_obs["txn_id"], "accepted"), (lone_obs["txn_id"], "committed"), (last_mine["txn_id"], "accepted")}
    assert states["theirs"] == {(lone_file["txn_id"], "failed"), (file_of_obs["txn_id"], "committed"), (last_theirs["txn_id"], "accepted")}
    every = [lone_file, both, lone_obs, file_of_obs, last_mine, last_theirs]
    assert {txn for txn, _ in states["admin"]} == {receipt["txn_id"] for receipt in every}
    assert (both["txn_id"], "committed") in states["admin"]
    failure = next(change for change in seen["theirs"] if change["state"] == "failed")
    assert failure["txn_id"] == lone_file["txn_id"] and missing in failure["reason"]  # a reason quotes row values
    assert not [change for changes in seen.values() for change in changes if "tables" in change]


@pytest.mark.timeout(120)
def test_a_transaction_is_seen_only_by_tokens_of_every_table_it_involves(own_redis, live_api, observation, primary_engine, replica_engine):
    """A transaction of two tables, drained (one commits, one fails with a reason quoting its values), and
    a direct write: each token sees exactly those it may read or write every table of, and any other
    is answered as an unknown transaction."""
    from ingest_api.deps import get_buffer
    from opsync import drain

    readers = {  # scopes -> which of the transactions below they may see
        (f"read:{T}",): set(),
        (f"read:{OTHER}",): set(),
        (f"write:{T}",): set(),
        (f"read:{T}", f"read:{OTHER}"): {"both", "doomed"},
        (f"read:{T}", f"write:{OTHER}"): {"both", "doomed"},
        (f"write:{T}", f"write:{OTHER}", "write:instrument"): {"both", "doomed", "direct"},
        ("read:instrument",): {"direct"},
        ("admin",): {"both", "doomed", "direct"},
    }
    made = {scopes: issue(primary_engine, replica_engine, list(scopes))[1] for scopes in readers}
    admin = made[("admin",)]
    missing_obs_unit = str(uuid.uuid4())
    with httpx.Client(base_url=live_api, timeout=10) as client:
        txns = {
            "both": submit(client, admin, obs_step(observation(), "obs"), file_step({"$ref": "obs"})),
            "doomed": submit(client, admin, obs_step(observation(obs_unit_id=missing_obs_unit), "obs"), file_step({"$ref": "obs"})),
            "direct": submit(client, admin, {"table": "instrument", "values": {"name": f"SCOPES-{uuid.uuid4().hex[:8]}"}}),
        }
        assert (summary := drain.drain(get_buffer(), primary_engine)).dead_lettered == 1, summary
        ids = {name: receipt["txn_id"] for name, receipt in txns.items()}
        unknown = str(uuid.uuid4())
        for scopes, visible in readers.items():
            headers = bearer(made[scopes])
            listed = client.get("/v1/transactions", params={"ids": ",".join([*ids.values(), unknown])}, headers=headers)
            assert listed.status_code == 200 and listed.json()[unknown] is None
            nothing = client.get(f"/v1/transactions/{unknown}", headers=headers)
            assert nothing.status_code == 404
            for name, txn_id in ids.items():
                one = client.get(f"/v1/transactions/{txn_id}", headers=headers)
                with client.stream("GET", "/v1/events", params={"txn_id": txn_id}, headers=headers) as followed:
                    follow_status = followed.status_code
                    if follow_status != 200:
                        follow_answer = followed.read().decode()
                if name in visible:
                    assert one.status_code == 200 and one.json() == {"txn_id": txn_id, **listed.json()[txn_id]}, (scopes, name)
                    assert follow_status == 200
                else:  # exactly what an unknown transaction gets
                    assert one.status_code == 404 and one.text.replace(txn_id, unknown) == nothing.text, (scopes, name)
                    assert listed.json()[txn_id] is None, (scopes, name)
                    assert follow_status == 404 and unknown_txn(txn_id) in follow_answer, (scopes, name)
            if "doomed" in visible:
                failed = listed.json()[ids["doomed"]]
                assert failed["state"] == "failed" and missing_obs_unit in failed["reason"]  # the reason quotes row values
                assert listed.json()[ids["both"]]["state"] == "committed"
            if "direct" in visible:
                assert listed.json()[ids["direct"]]["state"] == "committed"

        # A status recorded before statuses named their tables: only admin may see it.
        both = get_buffer().statuses([ids["both"]])[0]
        get_buffer().client.hdel(*get_buffer().travel_key(ids["both"]))
        get_buffer().client.hset(get_buffer().status_key(ids["both"]), mapping={k: v for k, v in both.items() if k != "tables"})
        assert client.get(f"/v1/transactions/{ids['both']}", headers=bearer(made[(f"read:{T}", f"read:{OTHER}")])).status_code == 404
        assert client.get(f"/v1/transactions/{ids['both']}", headers=bearer(admin)).status_code == 200


def unknown_txn(txn_id: str) -> str:
    return f"no transaction {txn_id} (unknown"


STREAM_ENDINGS = {"revoked": "token revoked", "expired": "token expired", "narrowed": "the token's scopes changed; reconnect"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", sorted(STREAM_ENDINGS))
def test_a_stream_ends_within_the_token_cache_ttl_once_its_token_is_revoked_or_expired(
    token_cache_ttl, live_api, primary_engine, replica_engine, monkeypatch, ending
):
    """Also when its scopes are narrowed (only by SQL: no command changes a token's scopes)."""
    configure(monkeypatch, events_keepalive_s=0.2)
    expires_at = datetime.now(UTC) + timedelta(seconds=3) if ending == "expired" else None
    name, token = issue(primary_engine, replica_engine, [f"read:{T}", f"read:{OTHER}"], expires_at)
    with httpx.Client(base_url=live_api, timeout=10) as client, ExitStack() as stack:
        events = following(client, token, stack)
        if ending == "expired":
            time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()))
        else:
            if ending == "revoked":
                assert revoke_token(primary_engine, name)
            else:
                with primary_engine.begin() as conn:
                    conn.execute(update(ApiToken).where(ApiToken.name == name).values(scopes=[f"read:{OTHER}"]))
            with replica_engine.connect() as conn:  # the site can know from when the replica has it
                while conn.execute(
                    select(ApiToken.revoked_at.is_(None) & (func.cardinality(ApiToken.scopes) == 2)).where(ApiToken.name == name)
                ).scalar():
                    conn.rollback()
                    time.sleep(0.02)
        ended_at = time.monotonic()
        event = events.next()
        while event is not None and event[0] is None:  # state changes of other tests' transactions: none here
            event = events.next()
        closed_after = time.monotonic() - ended_at
        assert event == ("closed", {"detail": STREAM_ENDINGS[ending]})
        assert events.next() is None, "the stream went on after its final event"
    assert closed_after < token_cache_ttl + 0.5, closed_after


# --- backpressure answers authorised writers only -------------------------------------------------


WRITES = [route for route in ROUTES if route[0] != "GET" and route not in PUBLIC]  # each has a SPECS entry (above)


def test_backpressure_answers_only_authorised_writers(own_redis, live_api, tokens, observation, monkeypatch):
    """Above a tiny high-water mark, every write route answers 401 to a caller without a valid token and
    403 to one without the scope, as below it; only an authorised writer is told the buffer is full."""
    configure(monkeypatch, high_water_entries=1, backpressure_cache_s=0, retry_after_s=11)
    with httpx.Client(base_url=live_api, timeout=10) as client:
        receipt = submit(client, tokens["admin"], obs_step(observation(), "obs"), file_step({"$ref": "obs"}))
        rows = {T: receipt["ids"][0], OTHER: receipt["ids"][1]}  # the rows PATCH and DELETE would change
        callers = {"nobody": {}, "unknown": bearer(TOKEN_PREFIX + secrets.token_urlsafe(32)), "revoked": bearer(tokens["revoked"])}
        for route in WRITES:
            spec = SPECS[route]
            path, body = spec.request(observation(), rows[spec.scope.partition(":")[2]])
            for who, headers in callers.items():
                response = client.request(route[0], path, json=body, headers=headers)
                assert response.status_code == 401, (route, who, response.text)
                assert "high-water" not in response.text and "Retry-After" not in response.headers
            for unscoped in (tokens[f"not {spec.scope}"], tokens["unrelated"]):  # near misses; read of another table
                response = client.request(route[0], path, json=body, headers=bearer(unscoped))
                assert response.status_code == 403 and "lacks scope" in response.json()["detail"], (route, response.text)
                assert "high-water" not in response.text and "Retry-After" not in response.headers
            full = client.request(route[0], path, json=body, headers=bearer(tokens[spec.scope]))
            assert full.status_code == 503, (route, full.text)
            assert "high-water mark 1" in full.json()["detail"] and full.headers["Retry-After"] == "11"
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "high-water mark" in ready.json()["detail"]
    assert not any(char.isdigit() for char in ready.json()["detail"])  # public: why, not the buffer's figures
