"""Fuzzing the ingest API from its own OpenAPI schema (schemathesis): no 5xx, every answer as documented
(status code, content type, body schema), and after every case nothing half-written in the site buffer.

The in-process app runs on real services: a fresh durable Redis per operation (``own_redis``) and
the test PostgreSQL primary and replica; requests carry a real token with every scope. About 500
cases per operation, a few thousand in all; ``OPSYNC_FUZZ_EXAMPLES`` sets the number per operation.
"""

import copy
import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingest_api.app import app as ingest
from opsync import registry
from opsync.buffer import Buffer

EXAMPLES = int(os.environ.get("OPSYNC_FUZZ_EXAMPLES", "500"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def app(own_redis, ingest_app):
    """The app on a Redis of its own: the consistency check then sees every key, and only this operation's."""
    return ingest_app


@pytest.fixture
def bearer(issue_token) -> dict[str, str]:
    """A real token with every scope, so generated requests reach validation and the buffer."""
    return {"Authorization": f"Bearer {issue_token(['admin'])}"}


def fuzzable(spec: dict) -> dict:
    """The app's schema as served at /openapi.json, with two changes for the fuzzer.

    Table names are narrowed to the registered tables, so most cases get past the table to the
    values and the buffer (unknown tables are refused first, and tests/test_api_bad_input.py
    tries hostile ones). The transaction example goes: its ``{"$ref": "obs"}`` (a step reference,
    the API's own syntax) is taken by schemathesis for a JSON reference.
    """
    spec = copy.deepcopy(spec)
    tables = sorted(map(str, registry.REGISTRY))
    for operations in spec["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "table":
                    parameter["schema"]["enum"] = tables
    schemas = spec["components"]["schemas"]
    schemas["StepIn"]["properties"]["table"]["enum"] = tables
    del schemas["TransactionIn"]["examples"]
    return spec


# Built in-process (schemathesis' lazy fixture loader does not run under pytest 9).
# /v1/events is an endless stream: tests/test_api_guarantees.py covers it.
schema = schemathesis.openapi.from_dict(fuzzable(ingest.openapi())).exclude(path="/v1/events")


def decoded(values: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in values.items()}


def assert_consistent(buffer: Buffer) -> None:
    """Whatever the request, the buffer's keys agree: nothing half-written.

    Each stream entry has its ``accepted`` status pointing back at it and counts in the depth; every
    status belongs to a stream entry or (direct tables) to a commit awaiting the replica; every
    overlay row was written by a buffered transaction that touches it, and the indexes point at
    rows that exist.
    """
    client = buffer.client
    entries = {sid.decode(): json.loads(fields[b"txn"]) for sid, fields in client.xrange(buffer.stream)}
    assert int(client.get(buffer.unsent) or 0) == len(entries)
    by_txn = {txn["txn_id"]: (sid, txn) for sid, txn in entries.items()}
    awaiting = {m.decode() for m in client.zrange(buffer.awaiting_replica, 0, -1)}
    statuses = {key.decode().removeprefix(buffer.status_key("")): decoded(client.hgetall(key))
                for key in client.scan_iter(buffer.status_key("*"))}
    assert set(statuses) == set(by_txn) | awaiting
    for txn_id, (sid, _) in by_txn.items():
        assert statuses[txn_id]["state"] == "accepted" and statuses[txn_id]["stream_id"] == sid
    for txn_id in awaiting:
        assert statuses[txn_id]["state"] == "committed" and statuses[txn_id]["commit_lsn"]
    touched = {(step["table"], step["key"]): txn["txn_id"] for txn in entries.values() for step in txn["steps"]}
    rows = {}
    for key in client.scan_iter(buffer.row_key("*", "*").replace("*:*", "*")):
        _, _, table, row = key.decode().split(":", 3)
        rows[(table, row)] = decoded(client.hgetall(key))
    assert set(rows) == set(touched)
    for (table, row), fields in rows.items():
        assert fields["txn_id"] == touched[(table, row)]
        listed = client.zscore(buffer.rows_index(table), row) is not None
        assert listed == (fields.get("deleted") != "1")
    for key in client.scan_iter(f"{buffer.prefix}:rows:*"):
        table = key.decode().split(":", 2)[2]
        assert all((table, m.decode()) in rows for m in client.zrange(key, 0, -1))
    for key in client.scan_iter(f"{buffer.prefix}:idx:*"):
        _, _, table, field, value = key.decode().split(":", 4)
        for member in client.zrange(key, 0, -1):
            assert rows[(table, member.decode())].get(f"v:{field}") == value


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_ingest_api_answers_as_documented(case, app, bearer):
    from ingest_api.deps import get_buffer

    response = case.call(app=app, headers=bearer)
    case.validate_response(response, checks=CHECKS, headers=bearer)
    assert_consistent(get_buffer())
