"""The primary's schema: migrations match the models, constraints bite, the registry validates."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import CheckConstraint, create_engine, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from opsync import migrate, schema
from opsync.ids import new_id
from opsync.registry import Mode, UnknownTable, get_table, ingestible_tables

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
SHA = "ab" * 32
TAKEN_PATH = "/data/taken.fits"
NOWHERE = uuid.UUID(int=1)  # a key no row has


def fresh_database(pg) -> str:
    return pg.primary.create_database(f"schema_{uuid.uuid4().hex[:12]}")


def schema_diff(engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, schema.Base.metadata)


def check_constraint_names(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid <> 0")))


@pytest.fixture(scope="module")
def engine(pg):
    url = fresh_database(pg)
    migrate.upgrade(url)
    engine = create_engine(url)
    yield engine
    engine.dispose()


def test_migrations_match_models_and_round_trip(pg):
    url = fresh_database(pg)
    engine = create_engine(url)
    migrate.upgrade(url)
    assert schema_diff(engine) == []
    migrate.downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    migrate.upgrade(url)
    assert schema_diff(engine) == []
    engine.dispose()


def test_every_check_constraint_is_migrated(engine):
    """compare_metadata does not look at CHECK constraints, so compare them by name."""
    declared = {
        constraint.name
        for table in schema.Base.metadata.tables.values()
        for constraint in table.constraints
        if isinstance(constraint, CheckConstraint)
    }
    assert declared and declared == check_constraint_names(engine)


@pytest.fixture(scope="module")
def parents(engine) -> dict[str, uuid.UUID]:
    """One valid row per parent table, committed once; each test below adds a child to them."""
    ids = {name: new_id() for name in ("instrument", "module", "obs_unit", "executed", "package")}
    planned = {"name": "orion-1", "program": "P101", "source_name": "OMC-1", "ra_deg": 83.8, "dec_deg": -5.4}
    executed = {"obs_unit_id": ids["obs_unit"], "instrument_module_id": ids["module"], "start_time": T0}
    rows = [
        (schema.Instrument, {"id": ids["instrument"], "name": "CHAI"}),
        (schema.InstrumentModule, {"id": ids["module"], "instrument_id": ids["instrument"], "name": "LFA"}),
        (schema.ObsUnit, {"id": ids["obs_unit"], **planned}),
        (schema.ExecutedObsUnit, {"id": ids["executed"], **executed}),
        (schema.RawDataPackage, {"id": ids["package"], "name": "pkg-1", "executed_obs_unit_id": ids["executed"]}),
        (schema.RawDataFile, valid_row(schema.RawDataFile, ids) | {"path": TAKEN_PATH}),
        (schema.HousekeepingSample, valid_row(schema.HousekeepingSample, ids) | {"sampled_at": T0}),
    ]
    with engine.begin() as conn:
        for model, values in rows:
            conn.execute(insert(model), values)
    return ids


def valid_row(model: type[schema.Base], ids: dict[str, uuid.UUID]) -> dict:
    """A fresh row that inserts cleanly next to ``parents``; the cases below spoil one value each."""
    rows = {
        schema.ObsUnit: {
            "name": f"ou-{new_id()}",
            "program": "P101",
            "source_name": "OMC-1",
            "ra_deg": 0.0,
            "dec_deg": 90.0,
            "parameters": {"scan": "otf"},
        },
        schema.ExecutedObsUnit: {
            "obs_unit_id": ids["obs_unit"],
            "instrument_module_id": ids["module"],
            "start_time": T0,
            "end_time": T0,
            "status": "completed",
        },
        schema.RawDataFile: {
            "path": f"/data/{new_id()}.fits",
            "size_bytes": 0,
            "checksum_sha256": SHA,
            "file_type": "fits",
            "executed_obs_unit_id": ids["executed"],
            "raw_data_package_id": ids["package"],
        },
        schema.HousekeepingSample: {
            "instrument_module_id": ids["module"],
            "sensor": "mixer_t",
            "sampled_at": T0 + timedelta(seconds=1),
            "value": -1.5,
            "unit": "K",
        },
    }
    return rows[model]


BAD = [
    (schema.ExecutedObsUnit, {"status": "paused"}, "ck_executed_obs_unit_status"),
    (schema.ExecutedObsUnit, {"end_time": T0 - timedelta(seconds=1)}, "ck_executed_obs_unit_end_after_start"),
    (schema.ExecutedObsUnit, {"obs_unit_id": NOWHERE}, "fk_executed_obs_unit_obs_unit_id_obs_unit"),
    (schema.ObsUnit, {"dec_deg": 100.0}, "ck_obs_unit_dec_deg"),
    (schema.ObsUnit, {"ra_deg": 360.0}, "ck_obs_unit_ra_deg"),
    (schema.ObsUnit, {"priority": 0}, "ck_obs_unit_priority"),
    (schema.ObsUnit, {"parameters": ["otf"]}, "ck_obs_unit_parameters_is_object"),
    (schema.RawDataFile, {"size_bytes": -1}, "ck_raw_data_file_size_bytes"),
    (schema.RawDataFile, {"checksum_sha256": SHA.upper()}, "ck_raw_data_file_checksum_sha256"),
    (schema.RawDataFile, {"checksum_sha256": SHA[:-1]}, "ck_raw_data_file_checksum_sha256"),
    (schema.RawDataFile, {"path": TAKEN_PATH}, "uq_raw_data_file_path"),
    (schema.RawDataFile, {"raw_data_package_id": NOWHERE}, "fk_raw_data_file_raw_data_package_id_raw_data_package"),
    (schema.HousekeepingSample, {"sampled_at": T0}, "uq_housekeeping_sample_instrument_module_id_sensor_sampled_at"),
]


@pytest.mark.parametrize("model", sorted({model for model, _, _ in BAD}, key=lambda model: model.__tablename__))
def test_valid_rows_insert(engine, parents, model):
    """The control for the cases below: without the spoiled value the row is accepted."""
    with engine.connect() as conn:
        conn.execute(insert(model), valid_row(model, parents))
        conn.rollback()


@pytest.mark.parametrize(("model", "spoil", "constraint"), BAD, ids=[constraint for _, _, constraint in BAD])
def test_constraints_bite(engine, parents, model, spoil, constraint):
    with engine.connect() as conn, pytest.raises(IntegrityError) as raised:
        conn.execute(insert(model), valid_row(model, parents) | spoil)
    assert raised.value.orig.diag.constraint_name == constraint


def test_not_null_bites(engine, parents):
    row = valid_row(schema.HousekeepingSample, parents) | {"sensor": None}
    with engine.connect() as conn, pytest.raises(IntegrityError, match="sensor"):
        conn.execute(insert(schema.HousekeepingSample), row)


def test_ledger_records_the_applying_db_transaction(engine):
    with engine.begin() as conn:
        txn_id = new_id()
        conn.execute(insert(schema.SyncLedger), {"txn_id": txn_id, "site": "observatory"})
        current = conn.scalar(text("SELECT pg_current_xact_id()::text::bigint"))
        recorded = conn.scalar(select(schema.SyncLedger.db_txid).where(schema.SyncLedger.txn_id == txn_id))
    assert recorded == current


def test_validated_record_inserts(engine, parents):
    """What the registry accepts, the primary accepts: the same models drive both."""
    entry = get_table("raw_data_file")
    record = entry.create_model(**valid_row(schema.RawDataFile, parents))
    with engine.connect() as conn:
        conn.execute(insert(entry.table), record.model_dump(exclude_unset=True) | {"id": record.id})
        conn.rollback()


FILE = {
    "path": "/data/a.fits",
    "size_bytes": 10,
    "checksum_sha256": SHA,
    "file_type": "fits",
    "executed_obs_unit_id": str(NOWHERE),
}


def validation_error(table: str, record: dict, model: str = "create_model") -> dict:
    """The single error pydantic reports for ``record``."""
    with pytest.raises(ValidationError) as raised:
        getattr(get_table(table), model)(**record)
    (error,) = raised.value.errors()
    return error


def test_missing_required_field_is_named():
    record = {key: value for key, value in FILE.items() if key != "checksum_sha256"}
    error = validation_error("raw_data_file", record)
    assert (error["type"], error["loc"]) == ("missing", ("checksum_sha256",))


def test_unknown_field_is_rejected_by_name():
    error = validation_error("raw_data_file", FILE | {"colour": "red"})
    assert (error["type"], error["loc"]) == ("extra_forbidden", ("colour",))


def test_naive_datetime_is_rejected():
    record = {"instrument_module_id": str(NOWHERE), "sensor": "t", "value": 1.0, "sampled_at": "2026-11-21T03:00:00"}
    error = validation_error("housekeeping_sample", record)
    assert (error["type"], error["loc"]) == ("timezone_aware", ("sampled_at",))
    assert "timezone" in error["msg"]


@pytest.mark.parametrize(
    ("table", "record", "field"),
    [
        ("raw_data_file", FILE | {"checksum_sha256": SHA.upper()}, "checksum_sha256"),
        ("raw_data_file", FILE | {"size_bytes": -1}, "size_bytes"),
        ("raw_data_file", FILE | {"path": "/" + "x" * 1024}, "path"),
        ("obs_unit", {"name": "n", "program": "p", "source_name": "s", "ra_deg": 1, "dec_deg": 100}, "dec_deg"),
    ],
)
def test_rules_are_checked_at_ingest(table, record, field):
    assert validation_error(table, record)["loc"] == (field,)


def test_status_choices_are_checked_at_ingest():
    error = validation_error("executed_obs_unit", {"status": "paused"}, "update_model")
    assert (error["type"], error["loc"]) == ("literal_error", ("status",))


def test_ids_are_generated_at_ingest_time_ordered_v7():
    entry = get_table("raw_data_file")
    first, second = entry.create_model(**FILE), entry.create_model(**FILE | {"path": "/data/b.fits"})
    assert first.id.version == second.id.version == 7
    assert first.id < second.id
    given = new_id()
    assert entry.create_model(**FILE | {"id": str(given)}).id == given


def test_defaults_are_left_to_the_database():
    record = get_table("executed_obs_unit").create_model(
        obs_unit_id=NOWHERE, instrument_module_id=NOWHERE, start_time=T0
    )
    assert set(record.model_dump(exclude_unset=True)) == {"obs_unit_id", "instrument_module_id", "start_time"}
    assert "created_at" not in get_table("executed_obs_unit").create_model.model_fields


def test_update_model_is_partial_keeps_the_key_and_not_null():
    update = get_table("executed_obs_unit").update_model
    assert update(status="completed", end_time=T0).model_dump(exclude_unset=True) == {
        "status": "completed",
        "end_time": T0,
    }
    assert update(end_time=None).model_dump(exclude_unset=True) == {"end_time": None}
    assert validation_error("executed_obs_unit", {"id": str(new_id())}, "update_model")["type"] == "extra_forbidden"
    assert validation_error("executed_obs_unit", {"start_time": None}, "update_model")["loc"] == ("start_time",)


def test_critical_and_direct_tables():
    critical = {"executed_obs_unit", "raw_data_package", "raw_data_file", "housekeeping_sample"}
    assert {entry.name for entry in ingestible_tables(Mode.critical)} == critical
    assert {entry.name for entry in ingestible_tables(Mode.direct)} == {"instrument", "instrument_module", "obs_unit"}


def test_tables_are_listed_parents_first():
    seen: set[str] = set()
    for entry in ingestible_tables():
        assert {fk.referred_table.name for fk in entry.table.foreign_key_constraints} <= seen
        seen.add(entry.name)


@pytest.mark.parametrize("name", ["sync_ledger", "api_token", "no_such_table"])
def test_internal_and_unknown_tables_are_not_ingestible(name):
    with pytest.raises(UnknownTable, match=name):
        get_table(name)
