"""Bad input at the ingest API: each is a 4xx whose JSON names the field and the reason, and nothing
reaches the site buffer (real Redis and PostgreSQL, no mocks)."""

import json
import uuid
from datetime import UTC, datetime

import pytest

from tests import records

SHA = "cd" * 32
RAW = "/v1/records/raw_data_file"
OBS = "/v1/records/executed_obs_unit"


@pytest.fixture
def redis_state(redis_server):
    """What a write would change: the number of keys and the stream's length."""
    client = redis_server.client()

    def snapshot() -> tuple[int, int]:
        return client.dbsize(), client.xlen("opsync:buffer")

    yield snapshot
    client.close()


@pytest.fixture
def headers(auth_headers):
    return auth_headers("executed_obs_unit", "raw_data_file", "raw_data_package", "housekeeping_sample", "obs_unit")


@pytest.fixture
def raw_file(observation):
    """A valid raw_data_file record (its observation need not exist: that is checked at the primary)."""

    def values(**overrides) -> dict:
        return records.raw_file(str(uuid.uuid4()), **overrides)

    return values


def problems(response) -> list[dict]:
    """The JSON body's problems as ``[{"loc": [...], "msg": ...}]``, whatever the route's shape."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    detail = response.json()["detail"]
    if isinstance(detail, str):
        return [{"loc": [], "msg": detail}]
    return detail


def assert_refused(response, status: int, field: str, reason: str) -> None:
    """``status``, and one problem that names ``field`` (in its loc or its message) and says ``reason``."""
    assert response.status_code == status, response.text
    for p in problems(response):
        names_field = field in map(str, p["loc"]) or field in p["msg"]
        if names_field and reason.lower() in p["msg"].lower():
            return
    raise AssertionError(f"no problem naming {field!r} with {reason!r}: {response.text}")


@pytest.fixture
def refused(api_client, redis_state):
    """Send a request and check the refusal and that nothing was written to Redis."""

    def check(method: str, url: str, status: int, field: str, reason: str, **kwargs):
        before = redis_state()
        response = api_client.request(method, url, **kwargs)
        assert_refused(response, status, field, reason)
        assert redis_state() == before, "a refused request wrote to the site buffer"
        return response

    return check


def test_malformed_json(refused, headers):
    json_headers = headers | {"Content-Type": "application/json"}
    refused("POST", RAW, 422, "body", "JSON decode error", content=b'{"path": "/a", ', headers=json_headers)


@pytest.mark.parametrize(
    "body, reason",
    [
        ("just text", "valid dictionary"),
        (42, "valid dictionary"),
        (True, "valid dictionary"),
        ([1, 2], "valid dictionary"),
        (None, "field required"),
    ],
)
def test_records_body_must_be_an_object_or_a_list_of_objects(refused, headers, body, reason):
    refused("POST", RAW, 422, "body", reason, json=body, headers=headers)


@pytest.mark.parametrize(
    "body, field, reason",
    [
        ([], "body", "valid dictionary"),
        ("steps", "body", "valid dictionary"),
        ({}, "steps", "field required"),
        ({"steps": "insert"}, "steps", "valid list"),
        ({"steps": [42]}, "steps", "valid dictionary"),
        ({"steps": []}, "steps", "at least one step"),
    ],
)
def test_transaction_body_shape(refused, headers, body, field, reason):
    refused("POST", "/v1/transactions", 422, field, reason, json=body, headers=headers)


@pytest.mark.parametrize(
    "values, field, reason",
    [
        ({"size_bytes": "big"}, "size_bytes", "valid integer"),
        ({"size_bytes": 1.5}, "size_bytes", "valid integer"),
        ({"path": "p" * 1025}, "path", "at most 1024 characters"),
        ({"path": None}, "path", "NOT NULL"),
        ({"executed_obs_unit_id": "obs-1"}, "executed_obs_unit_id", "valid UUID"),
        ({"checksum_sha256": "XYZ"}, "checksum_sha256", "checksum_sha256 ~ '^[0-9a-f]{64}$'"),
        ({"file_type": "f" * 33}, "file_type", "at most 32 characters"),
        ({"size_bytes": -1}, "size_bytes", "size_bytes >= 0"),
    ],
)
def test_wrong_types_and_rules_name_the_field(refused, headers, raw_file, values, field, reason):
    refused("POST", RAW, 422, field, reason, json=raw_file(**values), headers=headers)


def test_negative_size_of_a_package_is_refused(refused, headers):
    body = {"name": f"pkg-{uuid.uuid4()}", "executed_obs_unit_id": str(uuid.uuid4()), "size_bytes": -5}
    refused("POST", "/v1/records/raw_data_package", 422, "size_bytes", "size_bytes >= 0", json=body, headers=headers)


def test_unknown_fields_are_refused(refused, headers, raw_file, observation):
    refused("POST", RAW, 422, "colour", "extra inputs are not permitted", json=raw_file(colour="red"), headers=headers)
    step = {"table": "executed_obs_unit", "values": observation(), "valeus": {"status": "completed"}}
    refused("POST", "/v1/transactions", 422, "valeus", "extra inputs are not permitted", json={"steps": [step]}, headers=headers)
    refused(
        "POST",
        "/v1/transactions",
        422,
        "atomic",
        "extra inputs are not permitted",
        json={"steps": [{"table": "executed_obs_unit", "values": observation()}], "atomic": False},
        headers=headers,
    )


def test_missing_required_fields(refused, headers, raw_file):
    body = raw_file()
    del body["checksum_sha256"], body["path"]
    response = refused("POST", RAW, 422, "path", "field required", json=body, headers=headers)
    assert_refused(response, 422, "checksum_sha256", "field required")
    refused("POST", "/v1/transactions", 422, "table", "field required", json={"steps": [{"values": {}}]}, headers=headers)


def test_unknown_table(refused, api_client, headers):
    # Writes name the table as the field at fault (422); reads of a table that does not exist are 404.
    refused("POST", "/v1/records/telescope", 422, "table", "not an ingestible table", json={}, headers=headers)
    refused("POST", "/v1/records/sync_ledger", 422, "table", "not an ingestible table", json={}, headers=headers)
    refused("GET", "/v1/records/telescope", 404, "telescope", "not an ingestible table", headers=headers)
    refused("GET", f"/v1/records/api_token/{uuid.uuid4()}", 404, "api_token", "not an ingestible table", headers=headers)


def test_too_many_records_in_one_request(refused, headers, site_env):
    rows = [{"sensor": "t"}] * (site_env.max_records_per_request + 1)
    limit = site_env.max_records_per_request
    refused("POST", "/v1/records/housekeeping_sample", 413, "records", f"at most {limit}", json=rows, headers=headers)


def test_body_larger_than_the_limit_by_content_length(refused, headers, site_env):
    body = b'{"path": "' + b"a" * site_env.max_body_bytes + b'"}'
    refused("POST", RAW, 413, "body", f"larger than {site_env.max_body_bytes} bytes", content=body, headers=headers)


def test_body_larger_than_the_limit_without_content_length(refused, headers, site_env):
    chunk = b"a" * 65536

    def chunked():  # a generator: httpx sends Transfer-Encoding: chunked, no Content-Length
        yield b'{"path": "'
        for _ in range(site_env.max_body_bytes // len(chunk) + 2):
            yield chunk
        yield b'"}'

    response = refused("POST", RAW, 413, "body", f"larger than {site_env.max_body_bytes} bytes", content=chunked(), headers=headers)
    assert "content-length" not in {k.lower() for k in response.request.headers}


def test_deeply_nested_json_is_refused(refused, headers, observation, site_env):
    nested: dict = {"leaf": 1}
    for _ in range(site_env.max_json_depth):
        nested = {"deeper": nested}
    refused("POST", OBS, 422, "metadata", f"at most {site_env.max_json_depth}", json=observation(metadata=nested), headers=headers)


def test_json_nested_beyond_the_parser_is_refused(refused, headers):
    body = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = refused("POST", OBS, 422, "body", "nested", content=body, headers=headers | {"Content-Type": "application/json"})
    assert "Traceback" not in response.text


def test_json_at_the_depth_limit_is_accepted(api_client, headers, observation, site_env):
    nested: dict = {"leaf": 1}
    for _ in range(site_env.max_json_depth - 1):
        nested = {"deeper": nested}
    response = api_client.post(OBS, json=observation(metadata=nested), headers=headers)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "values, field",
    [
        ({"path": "/data/a\u0000b.fits"}, "path"),
        ({"file_type": "\u0000"}, "file_type"),
    ],
)
def test_nul_characters_are_refused_at_the_site(refused, headers, raw_file, values, field):
    refused("POST", RAW, 422, field, "NUL", json=raw_file(**values), headers=headers)


def test_nul_characters_in_json_values_and_keys_are_refused(refused, headers, observation):
    refused("POST", OBS, 422, "metadata", "NUL", json=observation(metadata={"note": "a\u0000"}), headers=headers)
    refused("POST", OBS, 422, "metadata", "NUL", json=observation(metadata={"a": [{"k\u0000": 1}]}), headers=headers)
    refused("PATCH", f"{OBS}/{uuid.uuid4()}", 422, "metadata", "NUL", json={"metadata": {"x": "\u0000"}}, headers=headers)


def test_invalid_uuids_in_path_and_body(refused, headers, raw_file):
    refused("PATCH", f"{RAW}/not-a-uuid", 422, "row_id", "valid UUID", json={"size_bytes": 1}, headers=headers)
    refused("DELETE", f"{RAW}/123", 422, "row_id", "valid UUID", headers=headers)
    refused("GET", "/v1/transactions/xyz", 422, "txn_id", "valid UUID", headers=headers)
    refused("GET", f"{RAW}/xyz", 422, "row_id", "valid UUID", headers=headers)
    refused("POST", RAW, 422, "id", "valid UUID", json=raw_file(id="not-a-uuid"), headers=headers)
    refused("POST", RAW, 422, "id", "UUID input should be", json=[raw_file(), raw_file(id=12)], headers=headers)
    step = {"table": "raw_data_file", "id": "zzz", "values": raw_file()}
    refused("POST", "/v1/transactions", 422, "id", "valid UUID", json={"steps": [step]}, headers=headers)


def test_reference_to_a_step_that_does_not_exist(refused, headers, observation, raw_file):
    steps = [
        {"table": "executed_obs_unit", "ref": "obs", "values": observation()},
        {"table": "raw_data_file", "values": raw_file(executed_obs_unit_id={"$ref": "ops"})},
    ]
    refused("POST", "/v1/transactions", 422, "executed_obs_unit_id", "'ops' names no earlier step", json={"steps": steps}, headers=headers)
    # A step cannot refer to a later one either: references resolve in order.
    refused("POST", "/v1/transactions", 422, "executed_obs_unit_id", "names no earlier step", json={"steps": steps[::-1]}, headers=headers)
    dangling = raw_file(executed_obs_unit_id={"$ref": "obs"})
    refused("POST", RAW, 422, "executed_obs_unit_id", "names no earlier step", json=dangling, headers=headers)


def test_delete_and_update_where_the_table_does_not_allow_it(refused, headers):
    refused("DELETE", f"{OBS}/{uuid.uuid4()}", 422, "op", "cannot be deleted", headers=headers)
    refused("DELETE", f"/v1/records/housekeeping_sample/{uuid.uuid4()}", 422, "op", "cannot be deleted", headers=headers)
    refused("PATCH", f"{OBS}/{uuid.uuid4()}", 422, "id", "extra inputs are not permitted", json={"id": str(uuid.uuid4())}, headers=headers)
    refused("PATCH", f"{OBS}/{uuid.uuid4()}", 422, "values", "at least one field", json={}, headers=headers)
    refused("PATCH", f"{OBS}/{uuid.uuid4()}", 422, "status", "NOT NULL", json={"status": None}, headers=headers)
    managed = {"created_at": "2026-01-01T00:00:00Z"}
    refused("PATCH", f"{OBS}/{uuid.uuid4()}", 422, "created_at", "extra inputs", json=managed, headers=headers)


def test_end_before_start_breaks_the_schema_rule(refused, headers, observation):
    body = observation(start_time="2026-11-21T03:00:00Z", end_time="2026-11-21T02:00:00Z")
    refused("POST", OBS, 422, "end_time", "start_time", json=body, headers=headers)


@pytest.mark.parametrize(
    "when",
    ["9999-12-31T23:59:59-05:00", "10000-01-01T00:00:00Z", "0001-01-01T00:30:00+01:00"],
)
def test_timestamps_beyond_what_a_reader_can_load_are_refused(refused, headers, observation, when):
    refused("POST", OBS, 422, "start_time", "", json=observation(start_time=when), headers=headers)


def test_far_future_timestamp_without_a_rule_is_stored_as_given(api_client, headers, observation):
    when = "9999-06-30T12:00:00Z"
    response = api_client.post(OBS, json=observation(start_time=when, end_time="9999-12-31T23:59:59Z"), headers=headers)
    assert response.status_code == 202, response.text
    row = api_client.get(f"{OBS}/{response.json()['ids'][0]}", headers=headers).json()
    assert datetime.fromisoformat(row["start_time"]) == datetime(9999, 6, 30, 12, tzinfo=UTC)


def test_sql_text_in_values_is_stored_exactly(api_client, headers, raw_file):
    evil = "/data/x'); DROP TABLE raw_data_file; --\"\\ ;SELECT pg_sleep(10)"
    response = api_client.post(RAW, json=raw_file(path=evil, file_type="' OR 1=1 --"), headers=headers)
    assert response.status_code == 202, response.text
    row = api_client.get(f"{RAW}/{response.json()['ids'][0]}", headers=headers).json()
    assert row["path"] == evil and row["file_type"] == "' OR 1=1 --"
    listed = api_client.get(RAW, params={"file_type": "' OR 1=1 --"}, headers=headers)
    assert listed.status_code == 200 and [r["path"] for r in listed.json()["rows"]] == [evil]


def test_sql_text_in_a_direct_write_reaches_the_primary_exactly(api_client, auth_headers, primary_engine):
    from sqlalchemy import text

    name = f"X'); DELETE FROM instrument; --{uuid.uuid4().hex[:8]}"
    description = "'; DROP TABLE sync_ledger; -- \\ $$ %s %(x)s :param"
    body = {"name": name, "description": description}
    response = api_client.post("/v1/records/instrument", json=body, headers=auth_headers("instrument"))
    assert response.status_code == 202, response.text
    with primary_engine.connect() as conn:
        row = conn.execute(text("SELECT name, description FROM instrument WHERE id = :i"), {"i": response.json()["ids"][0]}).one()
        assert tuple(row) == (name, description)
        assert conn.execute(text("SELECT to_regclass('sync_ledger') IS NOT NULL")).scalar()


@pytest.mark.parametrize("table", ["raw_data_file;DROP TABLE sync_ledger", "raw_data_file'--", "pg_catalog.pg_user"])
def test_sql_text_in_table_names(refused, headers, table):
    refused("POST", f"/v1/records/{table}", 422, "table", "not an ingestible table", json={}, headers=headers)
    refused("GET", f"/v1/records/{table}", 404, table, "not an ingestible table", headers=headers)


def test_sql_text_in_field_names(refused, api_client, headers, raw_file):
    field = "path = 'x'; DROP TABLE raw_data_file; --"
    refused("POST", RAW, 422, field, "extra inputs are not permitted", json=raw_file(**{field: 1}), headers=headers)
    response = api_client.get(RAW, params={"1=1; --": "x"}, headers=headers)
    assert response.status_code == 400 and "cannot filter raw_data_file on '1=1; --'" in response.json()["detail"]


def test_unexpected_exception_is_a_json_500_with_a_request_id(api_client, headers, raw_file, redis_state, monkeypatch, caplog):
    from opsync.buffer import AsyncEnqueuer

    secret = "internal detail 7f3a that must not leak"

    async def broken(*args, **kwargs):
        raise RuntimeError(secret)

    monkeypatch.setattr(AsyncEnqueuer, "enqueue", broken)
    before = redis_state()
    response = api_client.post(RAW, json=raw_file(), headers=headers)
    assert response.status_code == 500
    body = response.json()
    assert set(body) == {"detail", "request_id"} and body["detail"] == "internal error"
    assert response.headers["X-Request-ID"] == body["request_id"]
    assert secret not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text
    assert body["request_id"] in caplog.text and secret in caplog.text  # the log has it, under that id
    assert redis_state() == before


def test_error_bodies_carry_no_input_echo_of_secrets(refused, headers, raw_file):
    # The Authorization header never appears in an error body.
    response = refused("POST", RAW, 422, "size_bytes", "valid integer", json=raw_file(size_bytes="x"), headers=headers)
    token = headers["Authorization"].removeprefix("Bearer ")
    assert token not in response.text
    assert json.loads(response.text)["detail"][0]["loc"][-1] == "size_bytes"


# --- unicode, numbers, paths: refused naming the field, or stored exactly as given ------------------

UNICODE = {
    "rtl": "מצפה \u202eevil\u202c الرصد",
    "zero_width": "a\u200bb\u200cc\u200dd\ufeff",
    "emoji": "🔭✨👩‍🔬🇨🇱",
    "nfc": "Atacama-\u00e9",
    "nfd": "Atacama-e\u0301",  # the same text to a reader, another string to a database: both kept, apart
    "astral": "\U0001d4d0\U00010348",
    "separators": "line\u2028para\u2029end",
    "controls": "tab\tcr\r\nbell\x07del\x7f",
}
TRAVERSAL = [  # file paths are data: stored as given, never opened, joined or normalised by opsync
    "../../etc/passwd",
    "/data/../../../etc/shadow",
    "..\\..\\windows\\system32\\config",
    "%2e%2e%2f%2e%2e%2fetc",
    "/data/./x/../../y",
    "~root/.ssh/id_rsa",
    "/dev/zero",
    "file:///etc/passwd",
]


def raw_json(value) -> bytes:
    """JSON as a hostile client may send it: ASCII escapes (lone surrogates survive), NaN and Infinity allowed."""
    return json.dumps(value).encode()


def test_unicode_and_traversal_paths_are_stored_exactly_through_the_buffer_and_the_primary(
    own_redis, api_client, headers, observation, primary_engine
):
    from sqlalchemy import text

    from ingest_api.deps import get_buffer
    from opsync import drain

    tag = uuid.uuid4().hex[:8]
    metadata = UNICODE | {value: name for name, value in UNICODE.items()}  # in keys too
    obs = api_client.post(OBS, json=observation(metadata=metadata), headers=headers)
    assert obs.status_code == 202, obs.text
    obs_id = obs.json()["ids"][0]
    paths = [f"{value}|{tag}" for value in [*UNICODE.values(), *TRAVERSAL]]
    files = {}
    for path in paths:
        response = api_client.post(
            RAW,
            json={"executed_obs_unit_id": obs_id, "path": path, "size_bytes": 1, "checksum_sha256": SHA, "file_type": "🔭\u200b"},
            headers=headers,
        )
        assert response.status_code == 202, response.text
        files[response.json()["ids"][0]] = path

    def merged_view() -> tuple[dict, dict]:
        row = api_client.get(f"{OBS}/{obs_id}", headers=headers).json()
        return row["metadata"], {i: api_client.get(f"{RAW}/{i}", headers=headers).json()["path"] for i in files}

    assert merged_view() == (metadata, files)
    nfd = api_client.get(RAW, params={"path": f"{UNICODE['nfd']}|{tag}"}, headers=headers).json()["rows"]
    assert [row["path"] for row in nfd] == [f"{UNICODE['nfd']}|{tag}"]  # not its NFC twin

    summary = drain.drain(get_buffer(), primary_engine)
    assert (summary.applied, summary.dead_lettered) == (1 + len(paths), 0)
    with primary_engine.connect() as conn:
        stored = conn.execute(text("SELECT metadata FROM executed_obs_unit WHERE id = :i"), {"i": obs_id}).scalar_one()
        rows = conn.execute(
            text("SELECT id::text, path, file_type FROM raw_data_file WHERE executed_obs_unit_id = :i"), {"i": obs_id}
        ).all()
    assert stored == metadata
    assert {i: p for i, p, _ in rows} == files and {t for _, _, t in rows} == {"🔭\u200b"}
    assert merged_view() == (metadata, files)  # now read from the primary's side, still the same


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"metadata": {"note": ["ok", "\\ud800"]}}', "metadata"),
        (b'{"metadata": {"\\udfff": 1}}', "metadata"),
        (b'{"status": "completed", "metadata": {"a": "\\udc00\\ud800"}}', "metadata"),
    ],
)
def test_lone_surrogates_are_refused(refused, headers, body, field):
    json_headers = headers | {"Content-Type": "application/json"}
    refused("PATCH", f"{OBS}/{uuid.uuid4()}", 422, field, "unpaired UTF-16 surrogate", content=body, headers=json_headers)


def test_a_lone_surrogate_in_a_text_column_or_a_key_is_refused_with_the_field(refused, headers, raw_file):
    json_headers = headers | {"Content-Type": "application/json"}
    refused("POST", RAW, 422, "path", "unicode", content=raw_json(raw_file(path="/data/\ud800.fits")), headers=json_headers)
    response = refused(
        "PATCH", f"{OBS}/{uuid.uuid4()}", 422, "\\udfff", "surrogate", content=raw_json({"metadata": {"\udfff": 1}}), headers=json_headers
    )
    assert response.json()["detail"][0]["loc"][-2:] == ["metadata", "\\udfff"]  # escaped, so the answer itself is valid


def test_a_body_that_is_not_utf8_is_refused(refused, headers):
    json_headers = headers | {"Content-Type": "application/json"}
    refused("POST", RAW, 400, "body", "not valid UTF-8", content=b'{"path": "/data/\xff\xfe.fits"}', headers=json_headers)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_numbers_json_cannot_carry_are_refused(refused, headers, observation, planning, number):
    """Python's parser accepts them; the drainer's JSON would turn them into null, and jsonb refuses them."""
    json_headers = headers | {"Content-Type": "application/json"}
    sample = {"instrument_module_id": str(planning["module"]), "sensor": "t", "sampled_at": "2026-11-21T03:00:00Z"}
    body = json.dumps(sample | {"value": "N"}).replace('"N"', number).encode()
    refused("POST", "/v1/records/housekeeping_sample", 422, "value", "not a finite number", content=body, headers=json_headers)
    body = json.dumps(observation(metadata={"tau": "N"})).replace('"N"', number).encode()
    refused("POST", OBS, 422, "tau", "not a finite number", content=body, headers=json_headers)


def test_integers_past_the_column_type_are_refused(refused, api_client, headers, raw_file):
    refused("POST", RAW, 422, "size_bytes", "out of range for bigint", json=raw_file(size_bytes=2**63), headers=headers)
    assert api_client.post(RAW, json=raw_file(size_bytes=2**63 - 1), headers=headers).status_code == 202


@pytest.mark.parametrize("limit", ["-1", "0", "1001", "1e3", "99999999999999999999"])
def test_page_sizes_out_of_range_are_refused(refused, headers, limit):
    refused("GET", f"{RAW}?limit={limit}", 422, "limit", "", headers=headers)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/records/..%2F..%2Fetc%2Fpasswd",
        "/v1/records/raw_data_file/../../../etc/passwd",
        "/v1/records/%2e%2e/%2e%2e/etc",
        "/v1/records/raw_data_file/%2e%2e%2fapi_token",
        "/v1/transactions/..%2F..%2F",
        "/v1/records/..\\..\\api_token",
    ],
)
def test_path_traversal_in_urls_finds_nothing(api_client, redis_state, headers, path):
    before = redis_state()
    response = api_client.get(path, headers=headers)
    assert response.status_code in (404, 422), response.text
    assert list(response.json()) == ["detail"]  # a refusal, never rows
    assert redis_state() == before
