"""Fuzzing the ingest API from its own OpenAPI schema (schemathesis): no 5xx, every answer as documented
(status code, content type, body schema), and after every case nothing half-written in the site buffer.

The in-process app runs on real services: a fresh durable Redis per operation (``own_redis``) and
the test PostgreSQL primary and replica; requests carry a real token with every scope. About 500
cases per operation, a few thousand in all; ``OPSYNC_FUZZ_EXAMPLES`` sets the number per operation.
"""

import copy
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
from tests.buffer_checks import assert_consistent

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


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_ingest_api_answers_as_documented(case, app, bearer):
    from ingest_api.deps import get_buffer

    response = case.call(app=app, headers=bearer)
    case.validate_response(response, checks=CHECKS, headers=bearer)
    assert_consistent(get_buffer())
