"""The ingest API's write path against real Redis and PostgreSQL (issue 2 demo scope)."""

import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from ingest_api.deps import get_verifier
from opsync.auth import hash_token, revoke_token
from tests.records import observation_with_file


@pytest.fixture
def api(ingest_app):
    with TestClient(ingest_app) as client:
        yield client


@pytest.fixture
def token(issue_token):
    """Headers with a fresh token granting ``verb:table`` for each table."""

    def headers(*tables: str, verbs=("write",)) -> dict:
        return {"Authorization": f"Bearer {issue_token([f'{v}:{t}' for t in tables for v in verbs])}"}

    return headers


def test_post_record_buffers_and_answers_202(api, token, observation):
    headers = token("executed_obs_unit")
    response = api.post("/v1/records/executed_obs_unit", json=observation(), headers=headers)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "accepted" and len(body["ids"]) == 1
    assert uuid.UUID(body["ids"][0]).version == 7
    status = api.get(body["status_url"], headers=headers).json()
    assert status["state"] == "accepted"


@pytest.mark.parametrize(
    ("host", "root_path", "base"),
    [
        ("api.site:8000", "", "http://api.site:8000/"),
        ("other.site", "", "http://other.site/"),
        ("api.site:8000", "/opsync", "http://api.site:8000/opsync/"),
    ],
)
def test_status_url_is_under_the_base_url_the_caller_used(ingest_app, token, observation, host, root_path, base):
    """Base URLs are parsed once per host and prefix: each caller still gets its own."""
    with TestClient(ingest_app, root_path=root_path) as api:
        response = api.post("/v1/records/executed_obs_unit", json=observation(), headers={**token("executed_obs_unit"), "Host": host})
    assert response.status_code == 202, response.text
    assert response.json()["status_url"] == f"{base}v1/transactions/{response.json()['txn_id']}"


def test_transaction_with_reference_between_steps(api, token, observation, redis_server):
    headers = token("executed_obs_unit", "raw_data_file")
    response = api.post("/v1/transactions", json={"steps": observation_with_file(observation())}, headers=headers)
    assert response.status_code == 202, response.text
    obs_id, file_id = response.json()["ids"]
    from opsync.buffer import Buffer
    from opsync.buffer.codec import decode

    entries = redis_server.client().xrange(Buffer(redis_server.client()).stream)
    txn = decode(entries[-1][1][b"txn"])
    assert txn.steps[1].values["executed_obs_unit_id"] == obs_id
    assert str(txn.steps[1].key) == file_id


def test_idempotency_key_replays_and_conflicts(api, token, observation, redis_server):
    headers = token("executed_obs_unit") | {"Idempotency-Key": str(uuid.uuid4())}
    body = observation()
    stream = "opsync:buffer"
    before = redis_server.client().xlen(stream)
    first = api.post("/v1/records/executed_obs_unit", json=body, headers=headers)
    again = api.post("/v1/records/executed_obs_unit", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert redis_server.client().xlen(stream) == before + 1
    other = api.post("/v1/records/executed_obs_unit", json=body | {"status": "aborted"}, headers=headers)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    too_long = api.post("/v1/records/executed_obs_unit", json=body, headers=headers | {"Idempotency-Key": "k" * 201})
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert redis_server.client().xlen(stream) == before + 1


def test_idempotency_keys_are_per_token(api, token, observation, redis_server):
    """Two tokens choosing the same key each get their own transaction; each replays only its own."""
    key, stream = str(uuid.uuid4()), "opsync:buffer"
    one, two = (token("executed_obs_unit", verbs=("write", "read")) | {"Idempotency-Key": key} for _ in range(2))
    body_one, body_two = observation(status="running"), observation(status="aborted")
    before = redis_server.client().xlen(stream)
    first = api.post("/v1/records/executed_obs_unit", json=body_one, headers=one)
    second = api.post("/v1/records/executed_obs_unit", json=body_two, headers=two)
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json()["txn_id"] != second.json()["txn_id"] and first.json()["ids"] != second.json()["ids"]
    assert redis_server.client().xlen(stream) == before + 2
    for headers, mine, theirs, receipt in ((one, body_one, body_two, first), (two, body_two, body_one, second)):
        assert api.post("/v1/records/executed_obs_unit", json=mine, headers=headers).json() == receipt.json()
        conflict = api.post("/v1/records/executed_obs_unit", json=theirs, headers=headers)
        assert conflict.status_code == 409 and key in conflict.json()["detail"]
        row = api.get(f"/v1/records/executed_obs_unit/{receipt.json()['ids'][0]}", headers=headers).json()
        assert row["status"] == mine["status"] and row["_txn_id"] == receipt.json()["txn_id"]
    assert redis_server.client().xlen(stream) == before + 2


def test_openapi_documents_the_bearer_scheme_and_the_idempotency_key(api):
    spec = api.get("/openapi.json").json()
    assert {scheme["scheme"] for scheme in spec["components"]["securitySchemes"].values()} == {"bearer"}
    for path, method in [
        ("/v1/records/{table}", "post"),
        ("/v1/transactions", "post"),
        ("/v1/records/{table}/{row_id}", "patch"),
        ("/v1/records/{table}/{row_id}", "delete"),
    ]:
        operation = spec["paths"][path][method]
        assert "Idempotency-Key" in [p["name"] for p in operation["parameters"] if p["in"] == "header"], (path, method)
        assert operation["security"], (path, method)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"start_time": "2026-11-21T02:00:00"}, "start_time"),  # naive time
        ({"status": "exploded"}, "status"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_record_names_the_field(api, token, observation, values, field):
    headers = token("executed_obs_unit")
    response = api.post("/v1/records/executed_obs_unit", json=observation() | values, headers=headers)
    assert response.status_code == 422
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"])


def test_missing_required_field_and_unknown_table(api, token):
    headers = token("executed_obs_unit", "nope")
    missing = api.post("/v1/records/executed_obs_unit", json={"status": "running"}, headers=headers)
    assert missing.status_code == 422
    assert {"obs_unit_id", "start_time"} <= {e["loc"][-1] for e in missing.json()["detail"]}
    unknown = api.post("/v1/records/nope", json={}, headers=headers)
    assert unknown.status_code == 422 and "not an ingestible table" in unknown.json()["detail"][0]["msg"]


def test_auth_is_required_and_scoped(api, token, observation, primary_engine):
    body = observation()
    assert api.post("/v1/records/executed_obs_unit", json=body).status_code == 401
    assert api.post("/v1/records/executed_obs_unit", json=body, headers={"Authorization": "Bearer ops_wrong"}).status_code == 401
    wrong_scope = token("raw_data_file")
    assert api.post("/v1/records/executed_obs_unit", json=body, headers=wrong_scope).status_code == 403
    invalid = api.post("/v1/records/executed_obs_unit", json={"status": "exploded"}, headers=wrong_scope)
    assert invalid.status_code == 403, "a token without the scope must not learn the table's rules"
    revoked = token("executed_obs_unit")
    assert api.post("/v1/records/executed_obs_unit", json=body, headers=revoked).status_code == 202
    digest = hash_token(revoked["Authorization"].removeprefix("Bearer "))
    with primary_engine.begin() as conn:
        name = conn.execute(text("SELECT name FROM api_token WHERE token_sha256 = :h"), {"h": digest}).scalar_one()
    assert revoke_token(primary_engine, name)
    get_verifier().ttl_s = 0  # as if the cache TTL had passed
    deadline = time.monotonic() + 10
    while (status := api.post("/v1/records/executed_obs_unit", json=body, headers=revoked).status_code) != 401:
        assert status == 202 and time.monotonic() < deadline
        time.sleep(0.05)
    assert "revoked" in api.post("/v1/records/executed_obs_unit", json=body, headers=revoked).json()["detail"]


def test_direct_table_is_written_to_the_primary(api, token, primary_engine):
    headers = token("instrument")
    name = f"SWEEP-{uuid.uuid4().hex[:6]}"
    response = api.post("/v1/records/instrument", json={"name": name}, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "committed" and response.json()["commit_lsn"]
    with primary_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM instrument WHERE name = :n"), {"n": name}).scalar() == 1
    duplicate = api.post("/v1/records/instrument", json={"name": name}, headers=headers)
    assert duplicate.status_code == 409 and "uq_instrument_name" in duplicate.json()["detail"]


def test_too_many_records(api, token, site_env):
    headers = token("housekeeping_sample")
    rows = [{}] * (site_env.max_records_per_request + 1)
    assert api.post("/v1/records/housekeeping_sample", json=rows, headers=headers).status_code == 413


def test_api_refuses_to_start_on_a_redis_that_is_not_durable(site_env, redis_server, monkeypatch):
    from ingest_api import deps
    from ingest_api.app import NotDurable, app
    from opsync.config import get_settings

    deps.get_redis.cache_clear()
    with redis_server.client() as client:
        client.config_set("appendfsync", "everysec")
        try:
            with pytest.raises(NotDurable, match="appendfsync=everysec"), TestClient(app):
                pass
            monkeypatch.setenv("OPSYNC_ALLOW_NON_DURABLE", "1")
            get_settings.cache_clear()
            with TestClient(app) as started:
                assert started.get("/readyz").status_code == 503
        finally:
            client.config_set("appendfsync", "always")
