"""The primary's schema: migrations match the models, constraints bite, admission follows them."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import CheckConstraint, create_engine, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from opsync import migrate, schema
from opsync.admission import ReplicaJudge
from opsync.envelope import Op
from opsync.ids import new_id
from opsync.ingest import Invalid, StepIn, build_transaction
from opsync.registry import Mode, UnknownTable, get_table, ingestible_tables
from opsync_observatory import models

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
SHA = "ab" * 32
TAKEN_PATH = "/data/taken.fits"
NOWHERE = uuid.UUID(int=1)  # a key no row has
METADATA = [schema.Base.metadata, models.Base.metadata]  # the engine's tables and the domain's


def fresh_database(pg) -> str:
    return pg.primary.create_database(f"schema_{uuid.uuid4().hex[:12]}")


def schema_diff(engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, METADATA)


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
        for metadata in METADATA
        for table in metadata.tables.values()
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
        (models.Instrument, {"id": ids["instrument"], "name": "CHAI"}),
        (models.InstrumentModule, {"id": ids["module"], "instrument_id": ids["instrument"], "name": "LFA"}),
        (models.ObsUnit, {"id": ids["obs_unit"], **planned}),
        (models.ExecutedObsUnit, {"id": ids["executed"], **executed}),
        (models.RawDataPackage, {"id": ids["package"], "name": "pkg-1", "executed_obs_unit_id": ids["executed"]}),
        (models.RawDataFile, valid_row(models.RawDataFile, ids) | {"path": TAKEN_PATH}),
        (models.HousekeepingSample, valid_row(models.HousekeepingSample, ids) | {"sampled_at": T0}),
    ]
    with engine.begin() as conn:
        for model, values in rows:
            conn.execute(insert(model), values)
    return ids


def valid_row(model: type[models.Base], ids: dict[str, uuid.UUID]) -> dict:
    """A fresh row that inserts cleanly next to ``parents``; the cases below spoil one value each."""
    rows = {
        models.ObsUnit: {
            "name": f"ou-{new_id()}",
            "program": "P101",
            "source_name": "OMC-1",
            "ra_deg": 0.0,
            "dec_deg": 90.0,
            "parameters": {"scan": "otf"},
        },
        models.ExecutedObsUnit: {
            "obs_unit_id": ids["obs_unit"],
            "instrument_module_id": ids["module"],
            "start_time": T0,
            "end_time": T0,
            "status": "completed",
        },
        models.RawDataFile: {
            "path": f"/data/{new_id()}.fits",
            "size_bytes": 0,
            "checksum_sha256": SHA,
            "file_type": "fits",
            "executed_obs_unit_id": ids["executed"],
            "raw_data_package_id": ids["package"],
        },
        models.HousekeepingSample: {
            "instrument_module_id": ids["module"],
            "sensor": "mixer_t",
            "sampled_at": T0 + timedelta(seconds=1),
            "value": -1.5,
            "unit": "K",
        },
    }
    return rows[model]


BAD = [
    (models.ExecutedObsUnit, {"status": "paused"}, "ck_executed_obs_unit_status"),
    (models.ExecutedObsUnit, {"end_time": T0 - timedelta(seconds=1)}, "ck_executed_obs_unit_end_after_start"),
    (models.ExecutedObsUnit, {"obs_unit_id": NOWHERE}, "fk_executed_obs_unit_obs_unit_id_obs_unit"),
    (models.ObsUnit, {"dec_deg": 100.0}, "ck_obs_unit_dec_deg"),
    (models.ObsUnit, {"ra_deg": 360.0}, "ck_obs_unit_ra_deg"),
    (models.ObsUnit, {"priority": 0}, "ck_obs_unit_priority"),
    (models.ObsUnit, {"parameters": ["otf"]}, "ck_obs_unit_parameters_is_object"),
    (models.RawDataFile, {"size_bytes": -1}, "ck_raw_data_file_size_bytes"),
    (models.RawDataFile, {"checksum_sha256": SHA.upper()}, "ck_raw_data_file_checksum_sha256"),
    (models.RawDataFile, {"checksum_sha256": SHA[:-1]}, "ck_raw_data_file_checksum_sha256"),
    (models.RawDataFile, {"path": TAKEN_PATH}, "uq_raw_data_file_path"),
    (models.RawDataFile, {"raw_data_package_id": NOWHERE}, "fk_raw_data_file_raw_data_package_id_raw_data_package"),
    (models.HousekeepingSample, {"sampled_at": T0}, "uq_housekeeping_sample_instrument_module_id_sensor_sampled_at"),
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
    row = valid_row(models.HousekeepingSample, parents) | {"sensor": None}
    with engine.connect() as conn, pytest.raises(IntegrityError, match="sensor"):
        conn.execute(insert(models.HousekeepingSample), row)


def test_ledger_records_the_applying_db_transaction(engine):
    with engine.begin() as conn:
        txn_id = new_id()
        conn.execute(insert(schema.SyncLedger), {"txn_id": txn_id, "site": "observatory"})
        current = conn.scalar(text("SELECT pg_current_xact_id()::text::bigint"))
        recorded = conn.scalar(select(schema.SyncLedger.db_txid).where(schema.SyncLedger.txn_id == txn_id))
    assert recorded == current


def test_admitted_record_inserts(engine, parents):
    """What admission accepts, the primary accepts: through the drainer's statement, in a transaction rolled back."""
    from opsync import apply

    values = {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in valid_row(models.RawDataFile, parents).items()}
    txn = build_transaction([StepIn(table="raw_data_file", id=values.pop("id", None), values=values)], "test")
    with engine.connect() as conn:
        assert apply.apply_transaction(conn, txn)
        conn.rollback()


FILE = {
    "path": "/data/a.fits",
    "size_bytes": 10,
    "checksum_sha256": SHA,
    "file_type": "fits",
    "executed_obs_unit_id": str(NOWHERE),
}


def admit(table: str, values: dict, op: Op = Op.insert, engine=None):
    key = new_id() if op is Op.update else None
    judge = ReplicaJudge(engine) if engine is not None else None
    return build_transaction([StepIn(op=op, table=table, id=key, values=values)], "test", judge=judge)


def admission_error(table: str, record: dict, op: Op = Op.insert, engine=None) -> dict:
    """The single problem admission reports for ``record``, its location relative to the values."""
    with pytest.raises(Invalid) as raised:
        admit(table, record, op, engine)
    (error,) = raised.value.errors
    return error | {"loc": tuple(error["loc"][3:])}


def test_missing_required_field_is_named():
    record = {key: value for key, value in FILE.items() if key != "checksum_sha256"}
    error = admission_error("raw_data_file", record)
    assert (error["type"], error["loc"]) == ("missing", ("checksum_sha256",))


def test_unknown_field_is_rejected_by_name():
    error = admission_error("raw_data_file", FILE | {"colour": "red"})
    assert (error["type"], error["loc"]) == ("extra_forbidden", ("colour",))


def test_naive_datetime_is_rejected(engine):
    record = {"instrument_module_id": str(NOWHERE), "sensor": "t", "value": 1.0, "sampled_at": "2026-11-21T03:00:00"}
    error = admission_error("housekeeping_sample", record, engine=engine)
    assert error["loc"] == ("sampled_at",) and "UTC offset" in error["msg"]


@pytest.mark.parametrize(
    ("table", "record", "field"),
    [
        ("raw_data_file", FILE | {"checksum_sha256": SHA.upper()}, "checksum_sha256"),
        ("raw_data_file", FILE | {"checksum_sha256": SHA + "\n"}, "checksum_sha256"),  # PostgreSQL's $ is the end
        ("raw_data_file", FILE | {"size_bytes": -1}, "size_bytes"),
        ("raw_data_file", FILE | {"path": "/" + "x" * 1024}, "path"),
        ("obs_unit", {"name": "n", "program": "p", "source_name": "s", "ra_deg": 1, "dec_deg": 100}, "dec_deg"),
        ("obs_unit", {"name": "n", "program": "p", "source_name": "s", "ra_deg": "NaN", "dec_deg": 1}, "ra_deg"),
    ],
)
def test_rules_are_checked_at_ingest(table, record, field):
    assert admission_error(table, record)["loc"] == (field,)


def test_status_choices_are_checked_at_ingest():
    error = admission_error("executed_obs_unit", {"status": "paused"}, Op.update)
    assert error["loc"] == ("status",) and "IN ('running'" in error["msg"]


def test_ids_are_generated_at_ingest_time_ordered_v7():
    first, second = admit("raw_data_file", FILE).steps[0].key, admit("raw_data_file", FILE | {"path": "/data/b.fits"}).steps[0].key
    assert first.version == second.version == 7
    assert first < second
    given = new_id()
    txn = build_transaction([StepIn(table="raw_data_file", id=given, values=FILE)], "test")
    assert txn.steps[0].key == given


def test_values_are_kept_as_sent_and_defaults_left_to_the_database():
    values = {"obs_unit_id": str(NOWHERE), "instrument_module_id": str(NOWHERE).upper(), "start_time": "2026-11-21T04:00:00+01:00"}
    (step,) = admit("executed_obs_unit", values).steps
    assert step.values == values and "created_at" not in step.values
    assert step.shown == {
        "obs_unit_id": str(NOWHERE),
        "instrument_module_id": str(NOWHERE),
        "start_time": T0,
        "status": "running",
        "metadata": {},
    }  # what readers see at once: the primary's defaults


def test_updates_are_partial_keep_the_key_and_not_null():
    (step,) = admit("executed_obs_unit", {"status": "completed", "end_time": "2026-11-21T03:00:00Z"}, Op.update).steps
    assert step.values == {"status": "completed", "end_time": "2026-11-21T03:00:00Z"}
    assert admit("executed_obs_unit", {"end_time": None}, Op.update).steps[0].values == {"end_time": None}
    assert admission_error("executed_obs_unit", {"id": str(new_id())}, Op.update)["type"] == "extra_forbidden"
    assert admission_error("executed_obs_unit", {"start_time": None}, Op.update)["loc"] == ("start_time",)


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
