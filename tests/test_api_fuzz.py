"""Fuzzing the ingest API from its own OpenAPI schema (schemathesis): no 5xx, every answer as documented
(status code, content type, body schema), after every case nothing half-written in the site buffer,
and every operation answered with success at least once, so the fuzzer is known to reach past the
refusals to the buffer and the replica.

The in-process app runs on real services: a fresh durable Redis per operation (``own_redis``) and
the test PostgreSQL primary and replica; requests carry a real token with every scope. About 500
cases per operation, a few thousand in all; ``OPSYNC_FUZZ_EXAMPLES`` sets the number per operation.
"""

import copy
import json
import os
from collections import Counter
from uuid import UUID

import pydantic
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
from opsync.envelope import State
from opsync.ids import new_id
from opsync.ingest import StepIn, answer, build_transaction
from tests.buffer_checks import assert_consistent

EXAMPLES = int(os.environ.get("OPSYNC_FUZZ_EXAMPLES", "500"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SHA = "ab" * 32
SEED_ROWS = {  # a valid row of each buffered table, by its key (unique columns differ per key)
    "executed_obs_unit": lambda key: {"obs_unit_id": key, "instrument_module_id": key, "start_time": "2026-11-21T02:10:00Z"},
    "raw_data_file": lambda key: {
        "executed_obs_unit_id": key,
        "path": f"/data/seed-{key}.fits",
        "size_bytes": 1,
        "checksum_sha256": SHA,
        "file_type": "fits",
    },
    "raw_data_package": lambda key: {"name": f"seed-{key}", "executed_obs_unit_id": key},
    "housekeeping_sample": lambda key: {"instrument_module_id": key, "sensor": "t", "sampled_at": "2026-11-21T03:00:00Z", "value": 1.5},
}
ROW_KEYS = [str(new_id()) for _ in range(3)]  # rows of every buffered table when each operation's fuzzing starts
SEED_TXNS = {table: str(new_id()) for table in SEED_ROWS}  # the transaction that buffered them, per table


@pytest.fixture
def app(own_redis, ingest_app, site_env):
    """The app on a Redis of its own (the consistency check then sees every key, and only this
    operation's), holding the seeded rows and transactions the schema names."""
    from ingest_api.deps import get_buffer

    for table, txn_id in SEED_TXNS.items():
        steps = [StepIn(table=table, id=key, values=SEED_ROWS[table](key)) for key in ROW_KEYS]
        txn = build_transaction(steps, site_env.site).model_copy(update={"txn_id": UUID(txn_id)})
        get_buffer().enqueue(txn, answer(txn, State.accepted))
    return ingest_app


@pytest.fixture
def bearer(issue_token) -> dict[str, str]:
    """A real token with every scope, so generated requests reach validation and the buffer."""
    return {"Authorization": f"Bearer {issue_token(['admin'])}"}


@pytest.fixture
def successes(request):
    """Counts the operation's 2xx answers over all its cases: one at least, or the fuzzer never got
    past the refusals (checked when the cases are done, so it fails the test at teardown)."""
    counts: Counter[int] = Counter()
    yield counts
    if not counts:
        pytest.fail(f"{request.node.name}: no 2xx answer in any case", pytrace=False)


def fuzzable(spec: dict) -> dict:
    """The app's schema as served at /openapi.json, with changes for the fuzzer.

    Table names are narrowed to the registered tables, so most cases get past the table to the
    values and the buffer (unknown tables are refused first; tests/test_api_properties.py tries
    hostile ones). Bodies are described by each table's own models, as well as generically, so
    valid rows are generated; row and transaction ids may be the seeded ones, so reads, updates
    and deletes find something. The transaction example goes: its ``{"$ref": "obs"}`` (a step
    reference, the API's own syntax) is taken by schemathesis for a JSON reference.
    """
    spec = copy.deepcopy(spec)
    tables = sorted(map(str, registry.REGISTRY))
    known = {"row_id": seeded_or_any(ROW_KEYS), "txn_id": seeded_or_any(list(SEED_TXNS.values()))}
    for operations in spec["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "table":
                    parameter["schema"]["enum"] = tables
                elif parameter["name"] in known and parameter["in"] == "path":
                    parameter["schema"] = known[parameter["name"]]
                elif parameter["name"] == "ids":
                    parameter["schema"]["items"] = known["txn_id"]
    schemas = spec["components"]["schemas"]
    creates = {str(name): model_schema(input_model(entry, create=True), schemas) for name, entry in registry.REGISTRY.items()}
    updates = [model_schema(input_model(entry, create=False), schemas) for entry in registry.REGISTRY.values()]
    records = spec["paths"]["/v1/records/{table}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    records["anyOf"] += [*creates.values(), {"type": "array", "items": {"anyOf": list(creates.values())}, "minItems": 1}]
    patch = spec["paths"]["/v1/records/{table}/{row_id}"]["patch"]["requestBody"]["content"]["application/json"]
    patch["schema"] = {"anyOf": [patch["schema"], *updates]}
    step = schemas.pop("StepIn")
    step["properties"]["table"]["enum"] = tables
    schemas["StepIn"] = {"anyOf": [step, *(insert_step(table, create) for table, create in creates.items())]}
    del schemas["TransactionIn"]["examples"]
    return spec


def input_model(entry: registry.Ingestible, create: bool) -> type[pydantic.BaseModel]:
    """A model of valid values of ``entry``'s table for the fuzzer to generate from: each column's type
    narrowed by its length and rule; for a new row, NOT NULL columns without a default are required."""
    fields = {}
    for column in registry.input_columns(entry.table):
        if column.primary_key and not create:
            continue
        annotation = registry.python_type(column)
        required = create and not column.nullable and not registry.has_default(column) and not column.primary_key
        fields[column.key] = (annotation | None if column.nullable else annotation, ... if required else None)
    kind = "Create" if create else "Update"
    return pydantic.create_model(f"{entry.name}_{kind}", __config__=pydantic.ConfigDict(extra="forbid"), **fields)


def seeded_or_any(ids: list[str]) -> dict:
    return {"anyOf": [{"enum": ids}, {"type": "string", "format": "uuid"}]}


def model_schema(model, schemas: dict) -> dict:
    """``model``'s JSON schema, its definitions added to the spec's components (as plain JSON: some
    field names are SQLAlchemy's ``quoted_name``, which the schema validator refuses as keys)."""
    schema = json.loads(json.dumps(model.model_json_schema(ref_template="#/components/schemas/{model}")))
    schemas.update(schema.pop("$defs", {}))
    return schema


def insert_step(table: str, create: dict) -> dict:
    """A step inserting a valid row of ``table`` (its key comes from the step's ``id``, not its values)."""
    values = copy.deepcopy(create)
    values["properties"].pop("id", None)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["table", "values"],
        "properties": {
            "op": {"enum": ["insert"]},
            "table": {"enum": [table]},
            "values": values,
            "ref": {"type": "string"},
        },
    }


# Built in-process (schemathesis' lazy fixture loader does not run under pytest 9).
# /v1/events is an endless stream: tests/test_api_guarantees.py covers it.
schema = schemathesis.openapi.from_dict(fuzzable(ingest.openapi())).exclude(path="/v1/events")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_ingest_api_answers_as_documented(case, app, bearer, successes):
    from ingest_api.deps import get_buffer

    response = case.call(app=app, headers=bearer)
    case.validate_response(response, checks=CHECKS, headers=bearer)
    assert_consistent(get_buffer())
    if response.status_code < 300:
        successes[response.status_code] += 1
