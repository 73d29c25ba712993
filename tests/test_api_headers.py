"""Every ``503`` of the ingest API says when to retry (``Retry-After``), every ``202`` where to follow (``Location``),
and the OpenAPI document declares both on each route that can send them.

The routes come from ``app.routes``: a new route fails here until it is given the requests that provoke its
``503`` (``CAN_503``) and ``202`` (``ACCEPTS``), or is listed, with the reason, as one that cannot send them.
Each 503 is provoked for real, over HTTP, against the real services: Redis stopped, the buffer above its
high-water mark, the replica (token store, merged reads, existence checks) or the primary (direct tables)
out of reach (their URLs pointed at a port nothing listens on).
"""

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.routing import APIRoute

from ingest_api import deps, reads
from ingest_api.app import app
from opsync.config import get_settings
from tests.conftest import free_port
from tests.records import observation_with_file

Route = tuple[str, str]
ROUTES = sorted((method, route.path) for route in app.routes for method in (route.methods or set()) - {"HEAD"})
OBS, FILE, INSTRUMENT, OBS_UNIT = "executed_obs_unit", "raw_data_file", "instrument", "obs_unit"  # critical, critical, direct, direct


@dataclass(frozen=True)
class Seeds:
    """What the requests refer to: a buffered observation, a buffered (deletable) file and their transaction,
    a planned instrument and a deletable observing unit in the primary, and the test's observation values."""

    obs_row: str
    file_row: str
    txn: str
    instrument: str
    obs_unit: str
    observation: Callable[..., dict]


Request = Callable[[Seeds], tuple[str, dict | None]]  # path and JSON body


def obs(s: Seeds) -> tuple[str, dict]:
    return f"/v1/records/{OBS}", s.observation()


def obs_steps(s: Seeds) -> tuple[str, dict]:
    return "/v1/transactions", {"steps": [{"table": OBS, "values": s.observation()}]}


def finished() -> dict:
    return {"status": "completed", "end_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}


def finish_obs(s: Seeds) -> tuple[str, dict]:
    return f"/v1/records/{OBS}/{s.obs_row}", finished()


def finish_unknown_obs(s: Seeds) -> tuple[str, dict]:
    """A row the buffer does not hold: only the replica can say whether it exists."""
    return f"/v1/records/{OBS}/{uuid.uuid4()}", finished()


def delete_file(s: Seeds) -> tuple[str, None]:
    return f"/v1/records/{FILE}/{s.file_row}", None


def delete_unknown_file(s: Seeds) -> tuple[str, None]:
    return f"/v1/records/{FILE}/{uuid.uuid4()}", None


def instrument(s: Seeds) -> tuple[str, dict]:
    return f"/v1/records/{INSTRUMENT}", {"name": f"I-{uuid.uuid4().hex[:12]}"}


def instrument_steps(s: Seeds) -> tuple[str, dict]:
    return "/v1/transactions", {"steps": [{"table": INSTRUMENT, "values": {"name": f"I-{uuid.uuid4().hex[:12]}"}}]}


def rename_instrument(s: Seeds) -> tuple[str, dict]:
    return f"/v1/records/{INSTRUMENT}/{s.instrument}", {"name": f"I-{uuid.uuid4().hex[:12]}"}


def delete_obs_unit(s: Seeds) -> tuple[str, None]:
    return f"/v1/records/{OBS_UNIT}/{s.obs_unit}", None


def get_obs(s: Seeds) -> tuple[str, None]:
    return f"/v1/records/{OBS}/{s.obs_row}", None


def get_unknown_obs(s: Seeds) -> tuple[str, None]:
    return f"/v1/records/{OBS}/{uuid.uuid4()}", None


def list_obs(s: Seeds) -> tuple[str, None]:
    return f"/v1/records/{OBS}?limit=1", None


def txn_status(s: Seeds) -> tuple[str, None]:
    return f"/v1/transactions/{s.txn}", None


def txn_statuses(s: Seeds) -> tuple[str, None]:
    return f"/v1/transactions?ids={s.txn}", None


def follow_txn(s: Seeds) -> tuple[str, None]:
    """Following a named transaction reads its state before the stream begins (an open stream reports
    ``unavailable`` events instead: it has already answered 200)."""
    return f"/v1/events?txn_id={s.txn}", None


def bare(path: str) -> Request:
    return lambda s: (path, None)


# --- the causes of a 503, each provoked against the real services ---------------------------------

REDIS = "Redis stopped"
HIGH_WATER = "buffer above its high-water mark"
TOKEN_STORE = "replica out of reach, token not cached"
REPLICA = "replica out of reach, token cached"
PRIMARY = "primary out of reach"
CAUSES = (REDIS, HIGH_WATER, TOKEN_STORE, REPLICA, PRIMARY)

CAN_503: dict[Route, dict[str, Request]] = {
    ("POST", "/v1/records/{table}"): {REDIS: obs, HIGH_WATER: obs, TOKEN_STORE: obs, PRIMARY: instrument},
    ("POST", "/v1/transactions"): {REDIS: obs_steps, HIGH_WATER: obs_steps, TOKEN_STORE: obs_steps, PRIMARY: instrument_steps},
    ("PATCH", "/v1/records/{table}/{row_id}"): {
        REDIS: finish_obs,
        HIGH_WATER: finish_obs,
        TOKEN_STORE: finish_obs,
        REPLICA: finish_unknown_obs,
        PRIMARY: rename_instrument,
    },
    ("DELETE", "/v1/records/{table}/{row_id}"): {
        REDIS: delete_file,
        HIGH_WATER: delete_file,
        TOKEN_STORE: delete_file,
        REPLICA: delete_unknown_file,
        PRIMARY: delete_obs_unit,
    },
    ("GET", "/v1/records/{table}/{row_id}"): {REDIS: get_obs, TOKEN_STORE: get_obs, REPLICA: get_unknown_obs},
    ("GET", "/v1/records/{table}"): {REDIS: list_obs, TOKEN_STORE: list_obs, REPLICA: list_obs},
    ("GET", "/v1/transactions/{txn_id}"): {REDIS: txn_status, TOKEN_STORE: txn_status},
    ("GET", "/v1/transactions"): {REDIS: txn_statuses, TOKEN_STORE: txn_statuses},
    ("GET", "/v1/events"): {REDIS: follow_txn, TOKEN_STORE: follow_txn},
    ("GET", "/readyz"): {REDIS: bare("/readyz"), HIGH_WATER: bare("/readyz")},
}
NEVER_503: dict[Route, str] = {  # each is requested under every cause too, and must answer 200
    ("GET", "/healthz"): "liveness: the process answers, whatever the services do",
    ("GET", "/metrics"): "a figure that cannot be measured is left out (opsync_buffer_up 0): the scrape still answers",
    ("GET", "/openapi.json"): "built in process from the routes",
    ("GET", "/docs"): "a static page",
    ("GET", "/docs/oauth2-redirect"): "a static page",
    ("GET", "/redoc"): "a static page",
}

ACCEPTS: dict[Route, list[Request]] = {  # a buffered table's write and a direct table's (committed at once), each a 202
    ("POST", "/v1/records/{table}"): [obs, instrument],
    ("POST", "/v1/transactions"): [obs_steps, instrument_steps],
    ("PATCH", "/v1/records/{table}/{row_id}"): [finish_obs, rename_instrument],
    ("DELETE", "/v1/records/{table}/{row_id}"): [delete_file, delete_obs_unit],
}
NEVER_202: dict[Route, str] = {
    **{
        route: "a read: answers 200 with what it read"
        for route in [
            ("GET", "/v1/records/{table}/{row_id}"),
            ("GET", "/v1/records/{table}"),
            ("GET", "/v1/transactions/{txn_id}"),
            ("GET", "/v1/transactions"),
        ]
    },
    ("GET", "/v1/events"): "a stream: 200 once it begins",
    ("GET", "/readyz"): "a health check: 200 or 503",
    **{route: f"not a write ({reason})" for route, reason in NEVER_503.items()},
}


def test_every_route_is_classified_for_both_headers():
    """A route nobody classified fails here, so it cannot send a 503 or 202 that no test holds to the contract."""
    for can, never in ((CAN_503, NEVER_503), (ACCEPTS, NEVER_202)):
        assert not set(can) & set(never), "a route both can and cannot"
        assert set(can) | set(never) == set(ROUTES), "classify each route: the requests that provoke it, or why it cannot"
    assert all(CAN_503.values()) and all(ACCEPTS.values())
    declared_202 = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.status_code == 202 for m in r.methods}
    assert declared_202 == set(ACCEPTS)


def openapi_operations() -> Iterator[tuple[Route, dict]]:
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            yield (method.upper(), path), operation["responses"]


def test_openapi_declares_retry_after_on_every_503_and_location_on_every_202():
    seen = set()
    for route, responses in openapi_operations():
        seen.add(route)
        for code, header, can in (("503", "Retry-After", CAN_503), ("202", "Location", ACCEPTS)):
            if route in can:
                declared = responses.get(code, {}).get("headers", {}).get(header)
                assert declared is not None, f"{route} does not declare {header} on its {code}"
                assert declared["required"] is True
            else:
                assert code not in responses, f"{route} declares a {code} it cannot send"
    assert seen >= set(CAN_503) | set(ACCEPTS), "a route that sends these headers is missing from the OpenAPI document"
    retry_after = dict(openapi_operations())[("GET", "/readyz")]["503"]["headers"]["Retry-After"]
    assert retry_after["schema"] == {"type": "integer", "minimum": 1}


@pytest.fixture
def site(own_redis, live_api, auth_headers, observation, planning):
    """The API over real HTTP on this test's Redis, a token it has already checked (cached), and seeds."""
    headers = auth_headers(OBS, FILE, INSTRUMENT, OBS_UNIT)
    with httpx.Client(base_url=live_api, headers=headers, timeout=15) as client:

        def accepted(path: str, body: dict) -> dict:
            response = client.post(path, json=body)
            assert response.status_code == 202, response.text
            return response.json()

        first = accepted(f"/v1/records/{OBS}", observation())
        file_row = accepted("/v1/transactions", {"steps": observation_with_file(observation())})["ids"][1]
        unit = {"name": f"U-{uuid.uuid4().hex[:12]}", "program": "P1", "source_name": "Orion KL", "ra_deg": 83.8, "dec_deg": -5.4}
        obs_unit = accepted(f"/v1/records/{OBS_UNIT}", unit)["ids"][0]
        yield client, Seeds(first["ids"][0], file_row, first["txn_id"], str(planning["instrument"]), obs_unit, observation)


@contextmanager
def provoked(cause: str, own_redis, monkeypatch) -> Iterator[None]:
    """The services in the state ``cause`` names, and back to normal afterwards."""
    dead = f"postgresql+psycopg://opsync:x@127.0.0.1:{free_port()}/opsync"  # nothing listens there
    caches = {TOKEN_STORE: [deps.get_verifier], REPLICA: [reads.get_replica], PRIMARY: [deps.get_primary]}.get(cause, [])
    with monkeypatch.context() as env:
        if cause == REDIS:
            own_redis.stop()
        elif cause == HIGH_WATER:  # the seeds buffered more than one transaction
            env.setenv("OPSYNC_HIGH_WATER_ENTRIES", "1")
            env.setenv("OPSYNC_BACKPRESSURE_CACHE_S", "0")
        else:
            env.setenv("OPSYNC_PRIMARY_URL" if cause == PRIMARY else "OPSYNC_REPLICA_URL", dead)
        rebuild(caches)
        try:
            yield
        finally:
            if cause == REDIS:
                own_redis.start()
    rebuild(caches)


def rebuild(caches) -> None:
    get_settings.cache_clear()
    for cached in caches:
        cached.cache_clear()


def send(client: httpx.Client, method: str, path: str, body: dict | None) -> httpx.Response:
    """An event stream that opens would never end: its status and headers are read, then it is closed."""
    with client.stream(method, path, json=body) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        response.read()
        return response


def assert_retry_after(response: httpx.Response, what: str) -> None:
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    value = response.headers.get("Retry-After")
    assert value is not None and value.isdigit() and int(value) > 0, f"{what}: Retry-After {value!r}"


@pytest.mark.parametrize("cause", CAUSES)
def test_every_503_carries_retry_after(site, own_redis, monkeypatch, cause):
    client, seeds = site
    routes = {route: requests[cause] for route, requests in CAN_503.items() if cause in requests}
    assert routes, f"no route is provoked by {cause}"
    with provoked(cause, own_redis, monkeypatch):
        for (method, template), request in routes.items():
            path, body = request(seeds)
            assert_retry_after(send(client, method, path, body), f"{method} {template} with the {cause}")
        for method, path in NEVER_503:
            response = send(client, method, path, None)
            assert response.status_code == 200, f"{method} {path} with the {cause}: {response.status_code}"


def test_every_202_carries_the_location_of_a_status_that_answers(site):
    client, seeds = site
    for (method, template), requests in ACCEPTS.items():
        for request in requests:
            path, body = request(seeds)
            response = client.request(method, path, json=body)
            assert response.status_code == 202, f"{method} {path}: {response.text}"
            receipt = response.json()
            location = response.headers.get("Location")
            assert location == receipt["status_url"], f"{method} {template}: Location {location!r}"
            status = client.get(location)
            assert status.status_code == 200, f"{method} {template}: {location} answered {status.status_code}"
            assert status.json()["txn_id"] == receipt["txn_id"] and status.json()["state"] in ("accepted", "committed")
