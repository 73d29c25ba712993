"""The observatory's tables: instruments, observations, raw data, housekeeping; change capture on each.

Self-contained on purpose (it does not import the models, which will move on); the test suite
checks that it matches them exactly. The first revision of the ``observatory`` branch, on top of the
engine's tables (``depends_on``); an opsync 0.1 database at revision ``0002`` holds exactly this
and is stamped here by ``opsync.migrate`` (README "Upgrading from one revision line").

Revision ID: observatory_0001
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "observatory_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("observatory",)
depends_on: str | Sequence[str] | None = "engine_0001"

CAPTURED = (  # parents before children
    "instrument",
    "instrument_module",
    "obs_unit",
    "executed_obs_unit",
    "raw_data_package",
    "raw_data_file",
    "housekeeping_sample",
)

SHA256 = "~ '^[0-9a-f]{64}$'"
TIMESTAMPTZ = sa.DateTime(timezone=True)


def key() -> sa.Column:
    return sa.Column("id", sa.UUID(), nullable=False, comment="Time-ordered UUIDv7, generated before insert")


def timestamps() -> list[sa.Column]:
    return [
        sa.Column(
            "created_at",
            TIMESTAMPTZ,
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the row was written to the primary",
        ),
        sa.Column(
            "updated_at",
            TIMESTAMPTZ,
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the row was last changed on the primary",
        ),
    ]


def json_object(name: str, comment: str) -> sa.Column:
    return sa.Column(name, JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False, comment=comment)


def check(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def foreign_key(table: str, column: str, referred: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{referred}.id"], name=op.f(f"fk_{table}_{column}_{referred}"))


def index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    op.create_table(
        "instrument",
        key(),
        sa.Column("name", sa.String(64), nullable=False, comment="Short unique name, e.g. CHAI"),
        sa.Column("description", sa.Text(), nullable=True, comment="Free text"),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False, comment="False once retired"),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instrument")),
        sa.UniqueConstraint("name", name=op.f("uq_instrument_name")),
        comment="Telescope instruments",
    )
    op.create_table(
        "instrument_module",
        key(),
        sa.Column("instrument_id", sa.UUID(), nullable=False, comment="Instrument it belongs to"),
        sa.Column("name", sa.String(64), nullable=False, comment="Name, unique within the instrument"),
        sa.Column("description", sa.Text(), nullable=True, comment="Free text"),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False, comment="False once retired"),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instrument_module")),
        foreign_key("instrument_module", "instrument_id", "instrument"),
        sa.UniqueConstraint("instrument_id", "name", name=op.f("uq_instrument_module_instrument_id_name")),
        comment="Modules of an instrument",
    )
    op.create_table(
        "obs_unit",
        key(),
        sa.Column("name", sa.String(128), nullable=False, comment="Name, unique within the program"),
        sa.Column("program", sa.String(64), nullable=False, comment="Observing program (project) code"),
        sa.Column("source_name", sa.String(128), nullable=False, comment="Target source name"),
        sa.Column("ra_deg", sa.Double(), nullable=False, comment="Right ascension (ICRS), degrees, [0, 360)"),
        sa.Column("dec_deg", sa.Double(), nullable=False, comment="Declination (ICRS), degrees, [-90, 90]"),
        sa.Column(
            "priority",
            sa.SmallInteger(),
            server_default=sa.text("5"),
            nullable=False,
            comment="Scheduling priority, 1 (highest) to 10",
        ),
        json_object("parameters", "Open-ended observing setup (scan pattern, tuning, ...)"),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_obs_unit")),
        sa.UniqueConstraint("program", "name", name=op.f("uq_obs_unit_program_name")),
        check("obs_unit", "ra_deg", "ra_deg >= 0 AND ra_deg < 360"),
        check("obs_unit", "dec_deg", "dec_deg >= -90 AND dec_deg <= 90"),
        check("obs_unit", "priority", "priority >= 1 AND priority <= 10"),
        check("obs_unit", "parameters_is_object", "jsonb_typeof(parameters) = 'object'"),
        comment="Planned observations",
    )
    index("obs_unit", "program")
    index("obs_unit", "source_name")
    op.create_table(
        "executed_obs_unit",
        key(),
        sa.Column("obs_unit_id", sa.UUID(), nullable=False, comment="What was planned"),
        sa.Column("instrument_module_id", sa.UUID(), nullable=False, comment="Module that observed"),
        sa.Column(
            "status",
            sa.String(16),
            server_default=sa.text("'running'"),
            nullable=False,
            comment="One of: running, completed, failed, aborted",
        ),
        sa.Column("start_time", TIMESTAMPTZ, nullable=False, comment="Start of the execution (UTC)"),
        sa.Column("end_time", TIMESTAMPTZ, nullable=True, comment="End of the execution (UTC); empty while running"),
        json_object("metadata", "Open-ended execution details (weather, logs, ...)"),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executed_obs_unit")),
        foreign_key("executed_obs_unit", "obs_unit_id", "obs_unit"),
        foreign_key("executed_obs_unit", "instrument_module_id", "instrument_module"),
        check("executed_obs_unit", "status", "status IN ('running', 'completed', 'failed', 'aborted')"),
        check("executed_obs_unit", "end_after_start", "end_time >= start_time"),
        check("executed_obs_unit", "metadata_is_object", "jsonb_typeof(metadata) = 'object'"),
        comment="Observations as executed",
    )
    index("executed_obs_unit", "obs_unit_id")
    index("executed_obs_unit", "instrument_module_id", "start_time")
    index("executed_obs_unit", "status")
    index("executed_obs_unit", "start_time")
    op.create_table(
        "raw_data_package",
        key(),
        sa.Column("name", sa.String(255), nullable=False, comment="Unique package (archive file) name"),
        sa.Column("executed_obs_unit_id", sa.UUID(), nullable=False, comment="Observation whose files it holds"),
        sa.Column(
            "status",
            sa.String(16),
            server_default=sa.text("'open'"),
            nullable=False,
            comment="One of: open, sealed, transferred, archived, failed",
        ),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True, comment="Package size, bytes; known once sealed"),
        sa.Column(
            "checksum_sha256",
            sa.String(64),
            nullable=True,
            comment="SHA-256 of the package, lowercase hex; known once sealed",
        ),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_data_package")),
        sa.UniqueConstraint("name", name=op.f("uq_raw_data_package_name")),
        foreign_key("raw_data_package", "executed_obs_unit_id", "executed_obs_unit"),
        check("raw_data_package", "status", "status IN ('open', 'sealed', 'transferred', 'archived', 'failed')"),
        check("raw_data_package", "size_bytes", "size_bytes >= 0"),
        check("raw_data_package", "checksum_sha256", f"checksum_sha256 {SHA256}"),
        comment="Packages of raw data files",
    )
    index("raw_data_package", "executed_obs_unit_id")
    index("raw_data_package", "status")
    op.create_table(
        "raw_data_file",
        key(),
        sa.Column("path", sa.String(1024), nullable=False, comment="Path at the site, unique"),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False, comment="File size, bytes"),
        sa.Column("checksum_sha256", sa.String(64), nullable=False, comment="SHA-256, lowercase hex"),
        sa.Column("file_type", sa.String(32), nullable=False, comment="Format, e.g. fits, hdf5, log"),
        sa.Column("executed_obs_unit_id", sa.UUID(), nullable=False, comment="Observation that wrote it"),
        sa.Column(
            "raw_data_package_id",
            sa.UUID(),
            nullable=True,
            comment="Package it was put in; empty until packaged",
        ),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_data_file")),
        sa.UniqueConstraint("path", name=op.f("uq_raw_data_file_path")),
        foreign_key("raw_data_file", "executed_obs_unit_id", "executed_obs_unit"),
        foreign_key("raw_data_file", "raw_data_package_id", "raw_data_package"),
        check("raw_data_file", "size_bytes", "size_bytes >= 0"),
        check("raw_data_file", "checksum_sha256", f"checksum_sha256 {SHA256}"),
        comment="Raw data files",
    )
    index("raw_data_file", "file_type")
    index("raw_data_file", "executed_obs_unit_id")
    index("raw_data_file", "raw_data_package_id")
    op.create_table(
        "housekeeping_sample",
        key(),
        sa.Column("instrument_module_id", sa.UUID(), nullable=False, comment="Module the sensor belongs to"),
        sa.Column("sensor", sa.String(64), nullable=False, comment="Sensor name, e.g. mixer_temperature"),
        sa.Column("sampled_at", TIMESTAMPTZ, nullable=False, comment="Time of the reading (UTC)"),
        sa.Column("value", sa.Double(), nullable=False, comment="Reading, in the given unit"),
        sa.Column("unit", sa.String(16), nullable=True, comment="Unit, e.g. K, mbar, V; empty if dimensionless"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_housekeeping_sample")),
        foreign_key("housekeeping_sample", "instrument_module_id", "instrument_module"),
        sa.UniqueConstraint(
            "instrument_module_id",
            "sensor",
            "sampled_at",
            name=op.f("uq_housekeeping_sample_instrument_module_id_sensor_sampled_at"),
        ),
        comment="Instrument sensor readings",
    )
    index("housekeeping_sample", "sampled_at")
    for table in CAPTURED:
        op.capture_changes(table, key="id")  # type: ignore[attr-defined]  # registered by opsync.migration_ops


def downgrade() -> None:
    """Drop in reverse dependency order; indexes, constraints and capture triggers go with their tables."""
    for table in reversed(CAPTURED):
        op.drop_table(table)
