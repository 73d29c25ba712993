"""Admission rules one by one, through the real API, buffer, drainer, primary and replica: the site refuses
what the primary would refuse, keeps what it accepts exactly as sent, and shows what the primary stores."""

import json
import math
import uuid

import pytest
from sqlalchemy import create_engine, text

from opsync import admission
from opsync.buffer.codec import decode
from tests.records import raw_file

OBS = "/v1/records/executed_obs_unit"
RAW = "/v1/records/raw_data_file"
HK = "/v1/records/housekeeping_sample"


@pytest.fixture
def headers(auth_headers):
    return auth_headers("executed_obs_unit", "raw_data_file", "housekeeping_sample", "obs_unit") | {"Content-Type": "application/json"}


@pytest.fixture
def sample(planning):
    def values(**overrides) -> dict:
        return {
            "instrument_module_id": str(planning["module"]),
            "sensor": f"s-{uuid.uuid4().hex[:8]}",
            "sampled_at": "2026-11-21T03:00:00Z",
            "value": 1.5,
        } | overrides

    return values


def problem_at(response, field: str) -> str:
    """The message of the 422's problem located at ``field``."""
    assert response.status_code == 422, response.text
    found = [p["msg"] for p in response.json()["detail"] if field in map(str, p["loc"])]
    assert found, response.text
    return found[0]


def post(api_client, url: str, body, headers):
    return api_client.post(url, content=json.dumps(body).encode(), headers=headers)


def envelope_values(txn_id: str) -> list[dict]:
    """The values of a buffered transaction's steps as the envelope in the stream holds them."""
    from ingest_api.deps import get_buffer

    buffer = get_buffer()
    for _, fields in buffer.client.xrange(buffer.stream):
        txn = decode(fields[b"txn"])
        if str(txn.txn_id) == txn_id:
            return [step.values for step in txn.steps]
    raise AssertionError(f"{txn_id} is not in the buffer")


def drained(primary_engine, table: str, key: str, column: str):
    from ingest_api.deps import get_buffer
    from opsync import drain

    summary = drain.drain(get_buffer(), primary_engine)
    assert summary.dead_lettered == 0
    with primary_engine.connect() as conn:
        return conn.execute(text(f'SELECT "{column}" FROM "{table}" WHERE id = :k'), {"k": key}).scalar_one()


def test_the_same_key_twice_in_one_transaction_is_refused(api_client, headers, observation):
    key = str(uuid.uuid4())
    steps = [{"table": "executed_obs_unit", "id": key, "values": observation()}] * 2
    response = post(api_client, "/v1/transactions", {"steps": steps}, headers)
    assert "duplicate key" in problem_at(response, "id")
    again = [steps[0], {"table": "raw_data_file", "id": key, "values": raw_file(key)}]
    assert post(api_client, "/v1/transactions", {"steps": again}, headers).status_code == 202  # other tables: other keys


def test_a_dependant_naming_a_dead_lettered_row_in_another_spelling_is_named(own_redis, api_client, headers, observation, primary_engine):
    from ingest_api.deps import get_buffer
    from opsync import drain

    bad = post(api_client, OBS, observation(obs_unit_id=str(uuid.uuid4())), headers).json()  # no such planned observation
    spelled = "{" + bad["ids"][0].upper() + "}"
    dependant = post(api_client, RAW, raw_file(spelled), headers).json()
    assert drain.drain(get_buffer(), primary_engine).dead_lettered == 2
    reason = api_client.get(f"/v1/transactions/{dependant['txn_id']}", headers=headers).json()["reason"]
    assert reason == f"depends on dead-lettered transaction {bad['txn_id']}"


def test_a_unique_column_twice_in_one_request_is_refused(api_client, headers, observation):
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    path = f"/data/{uuid.uuid4()}"
    response = post(api_client, RAW, [raw_file(obs, path=path), raw_file(obs, path=path)], headers)
    assert "duplicate (path)" in problem_at(response, "path")


def test_a_change_of_a_row_deleted_earlier_in_the_transaction_is_refused(api_client, headers, observation):
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    key = str(uuid.uuid4())
    steps = [
        {"table": "raw_data_file", "id": key, "values": raw_file(obs)},
        {"op": "delete", "table": "raw_data_file", "id": key},
        {"op": "update", "table": "raw_data_file", "id": key, "values": {"size_bytes": 2}},
    ]
    assert "deleted by step 1" in problem_at(post(api_client, "/v1/transactions", {"steps": steps}, headers), "id")


def test_a_reference_to_a_step_of_another_table_as_a_foreign_key_is_refused(api_client, headers, observation, sample):
    steps = [
        {"table": "housekeeping_sample", "ref": "hk", "values": sample()},
        {"table": "raw_data_file", "values": raw_file({"$ref": "hk"})},
    ]
    message = problem_at(post(api_client, "/v1/transactions", {"steps": steps}, headers), "executed_obs_unit_id")
    assert "names a row of housekeeping_sample" in message and "refers to executed_obs_unit" in message
    steps[0] = {"table": "executed_obs_unit", "ref": "hk", "values": observation()}
    assert post(api_client, "/v1/transactions", {"steps": steps}, headers).status_code == 202


@pytest.mark.parametrize("ref", [["obs"], 7, {"name": "obs"}, None])
def test_a_reference_that_is_not_a_string_is_refused(api_client, headers, observation, ref):
    steps = [
        {"table": "executed_obs_unit", "ref": "obs", "values": observation()},
        {"table": "raw_data_file", "values": raw_file({"$ref": ref})},
    ]
    assert "a string" in problem_at(post(api_client, "/v1/transactions", {"steps": steps}, headers), "executed_obs_unit_id")


@pytest.mark.parametrize("offset", ["+16:00", "-16:00", "+23:59"])
def test_utc_offsets_beyond_what_postgresql_accepts_are_refused(api_client, headers, observation, offset):
    response = post(api_client, OBS, observation(start_time=f"2026-11-21T03:00:00{offset}"), headers)
    assert "beyond ±15:59" in problem_at(response, "start_time")


def test_the_largest_offset_postgresql_accepts_is_shown_in_utc(api_client, headers, observation):
    response = post(api_client, OBS, observation(start_time="2026-11-21T03:00:00+15:59"), headers)
    assert response.status_code == 202, response.text
    row = api_client.get(f"{OBS}/{response.json()['ids'][0]}", headers=headers).json()
    assert row["start_time"] == "2026-11-20T11:01:00Z"


@pytest.mark.parametrize(
    "when",
    [
        "0001-01-01T00:30:00+01:00",
        "9999-12-31T23:59:59-05:00",
        "10000-01-01T00:00:00Z",
        "0044-03-15 12:00:00+00 BC",
        "infinity",
        "-infinity",
    ],
)
def test_times_readers_cannot_load_are_refused(api_client, headers, observation, when):
    assert "years 1 to 9999" in problem_at(post(api_client, OBS, observation(start_time=when), headers), "start_time")


@pytest.mark.parametrize(
    "when, reason",
    [
        ("now", "relative time"),
        ("tomorrow 12:00+00", "relative time"),
        (" Today ", "relative time"),
        ("2026-11-21 03:00:00", "UTC offset"),
        ("Nov 21 2026 03:00", "UTC offset"),
    ],
)
def test_relative_and_naive_times_are_refused_naming_why(api_client, headers, observation, when, reason):
    assert reason in problem_at(post(api_client, OBS, observation(start_time=when), headers), "start_time")


def test_other_spellings_postgresql_accepts_are_judged_by_the_replica(api_client, headers, observation):
    response = post(api_client, OBS, observation(start_time="Nov 21 2026 03:00 PST"), headers)
    assert response.status_code == 202, response.text
    row = api_client.get(f"{OBS}/{response.json()['ids'][0]}", headers=headers).json()
    assert row["start_time"] == "2026-11-21T11:00:00Z"
    assert "invalid input syntax" in problem_at(post(api_client, OBS, observation(start_time="Nov 32 junk"), headers), "start_time")


def test_nan_as_a_string_is_kept_in_the_envelope_and_stored_as_nan(own_redis, api_client, headers, sample, primary_engine):
    response = post(api_client, HK, sample(value="NaN"), headers)
    assert response.status_code == 202, response.text
    assert envelope_values(response.json()["txn_id"])[0]["value"] == "NaN"
    assert math.isnan(drained(primary_engine, "housekeeping_sample", response.json()["ids"][0], "value"))


def test_an_integer_as_a_string_is_kept_shown_as_the_integer_and_stored(own_redis, api_client, headers, observation, primary_engine):
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    response = post(api_client, RAW, raw_file(obs, size_bytes=" 12 "), headers)
    assert response.status_code == 202, response.text
    key = response.json()["ids"][0]
    assert envelope_values(response.json()["txn_id"])[0]["size_bytes"] == " 12 "
    assert api_client.get(f"{RAW}/{key}", headers=headers).json()["size_bytes"] == 12
    assert drained(primary_engine, "raw_data_file", key, "size_bytes") == 12


@pytest.mark.parametrize("size", [1.0, 12.5, "1.0", "1e3", "0x10", "1_000", True, 2**63])
def test_what_bigint_refuses_is_refused(api_client, headers, observation, size):
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    problem_at(post(api_client, RAW, raw_file(obs, size_bytes=size), headers), "size_bytes")


@pytest.mark.parametrize("number", ["1e-400", "-1e-400", "1e400", "2.4e-324"])
def test_doubles_that_overflow_or_underflow_are_refused(api_client, headers, sample, number):
    body = json.dumps(sample(value="N")).replace('"N"', number).encode()
    assert "double" in problem_at(api_client.post(HK, content=body, headers=headers), "value")


def test_doubles_that_underflow_are_refused_in_transactions_and_updates_too(api_client, headers, sample, observation):
    step = json.dumps({"steps": [{"table": "housekeeping_sample", "values": sample(value="N")}]}).replace('"N"', "1e-400")
    assert "double" in problem_at(api_client.post("/v1/transactions", content=step.encode(), headers=headers), "value")
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    patch = api_client.patch(f"{OBS}/{obs}", content=b'{"metadata": {"tau": 1e-400}}', headers=headers)
    assert "double" in problem_at(patch, "tau")


def test_a_subnormal_double_is_accepted(api_client, headers, sample):
    body = json.dumps(sample(value="N")).replace('"N"', "1e-310").encode()
    assert api_client.post(HK, content=body, headers=headers).status_code == 202


def test_varchar_length_counts_characters_not_bytes_and_clips_trailing_spaces(api_client, headers, observation):
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    assert post(api_client, RAW, raw_file(obs, file_type="é" * 32), headers).status_code == 202
    assert post(api_client, RAW, raw_file(obs, file_type="🔭" * 32), headers).status_code == 202
    assert "at most 32 characters" in problem_at(post(api_client, RAW, raw_file(obs, file_type="é" * 33), headers), "file_type")
    response = post(api_client, RAW, raw_file(obs, file_type="fits" + " " * 40), headers)
    assert response.status_code == 202, response.text
    shown = api_client.get(f"{RAW}/{response.json()['ids'][0]}", headers=headers).json()["file_type"]
    assert shown == "fits" + " " * 28  # as varchar(32) stores it


def test_a_number_for_a_text_column_is_stored_as_postgresql_prints_it(api_client, headers, observation):
    obs = post(api_client, OBS, observation(), headers).json()["ids"][0]
    response = post(api_client, RAW, raw_file(obs, path=1e-7), headers)
    assert response.status_code == 202, response.text
    assert api_client.get(f"{RAW}/{response.json()['ids'][0]}", headers=headers).json()["path"] == "0.0000001"


def test_direct_writes_take_the_drainers_statement(api_client, auth_headers, primary_engine):
    body = {"name": f"o-{uuid.uuid4()}", "program": "P1", "source_name": "s", "ra_deg": " 1.5 ", "dec_deg": "-0", "priority": "7"}
    response = api_client.post("/v1/records/obs_unit", json=body, headers=auth_headers("obs_unit"))
    assert response.status_code == 202, response.text
    with primary_engine.connect() as conn:
        row = conn.execute(text("SELECT ra_deg, dec_deg, priority FROM obs_unit WHERE id = :k"), {"k": response.json()["ids"][0]}).one()
    assert tuple(row) == (1.5, 0.0, 7)


def test_a_value_only_postgresql_can_judge_waits_for_the_replica_and_common_records_do_not(
    api_client, headers, observation, sample, monkeypatch, site_env
):
    from conftest import free_port

    from ingest_api import records

    dead = create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none", connect_args={"connect_timeout": 1})
    monkeypatch.setattr(records, "get_judge", lambda: admission.ReplicaJudge(dead))
    response = post(api_client, OBS, observation(start_time="Nov 21 2026 03:00 PST"), headers)
    assert response.status_code == 503 and response.headers["Retry-After"] == str(site_env.retry_after_s), response.text
    assert "local replica" in response.json()["detail"]
    assert post(api_client, HK, sample(), headers).status_code == 202
    assert post(api_client, OBS, observation(start_time="2026-11-21T03:00:00+01:00"), headers).status_code == 202
    problem_at(post(api_client, OBS, observation(start_time="now"), headers), "start_time")  # refused without PostgreSQL


def test_a_check_python_does_not_know_is_evaluated_by_the_replica(replica_engine):
    judge = admission.ReplicaJudge(replica_engine)
    check = admission.Check("ra", "ra_deg >= 0 AND ra_deg < 360", ("ra_deg",), None)
    assert judge.holds("obs_unit", check, {"ra_deg": 10}) and judge.holds("obs_unit", check, {"ra_deg": None})
    assert not judge.holds("obs_unit", check, {"ra_deg": "NaN"})
