"""The primary's domain schema: observatory operations data, plus the sync ledger and API tokens.

Keys are UUIDv7 generated before insert (see :mod:`opsync.ids`), so a row can be referenced by
later steps while it is still buffered at the site. Column value rules are declared once as a
:class:`Rule`: the primary enforces them as CHECK constraints, and :mod:`opsync.registry` turns
the same rule into ingest validation, so bad data is refused at the site instead of being
dead-lettered hours later at the primary. Column comments (with units) become the column
descriptions of the read model.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from opsync.ids import new_id

NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

MANAGED = {"managed": True}  # column info: set by the database, never by a client


@dataclass(frozen=True)
class Rule:
    """A column's value constraint, declared once for the CHECK and for ingest validation."""

    ge: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None
    choices: tuple[str, ...] = ()

    def check(self, column: str) -> CheckConstraint:
        """The rule as a CHECK constraint on ``column``, named after it."""
        bounds = {">=": self.ge, "<=": self.le, "<": self.lt}
        terms = [f"{column} {op} {value}" for op, value in bounds.items() if value is not None]
        if self.pattern is not None:
            terms.append(f"{column} ~ '{self.pattern}'")
        if self.choices:
            quoted = ", ".join(f"'{choice}'" for choice in self.choices)
            terms.append(f"{column} IN ({quoted})")
        return CheckConstraint(" AND ".join(terms), name=column)

    @property
    def info(self) -> dict[str, Any]:
        """Column ``info`` that hands the rule to the registry."""
        return {"rule": self}


SHA256 = Rule(pattern="^[0-9a-f]{64}$")
NON_NEGATIVE = Rule(ge=0)
RIGHT_ASCENSION = Rule(ge=0, lt=360)
DECLINATION = Rule(ge=-90, le=90)
PRIORITY = Rule(ge=1, le=10)
EXECUTION_STATUS = Rule(choices=("running", "completed", "failed", "aborted"))
PACKAGE_STATUS = Rule(choices=("open", "sealed", "transferred", "archived", "failed"))


def json_object(column: str) -> CheckConstraint:
    """JSONB columns here hold objects (key/value metadata), never bare scalars or arrays."""
    return CheckConstraint(f"jsonb_typeof({column}) = 'object'", name=f"{column}_is_object")


def status_column(rule: Rule, initial: str) -> Mapped[str]:
    """A lifecycle status: one of the rule's choices, indexed for the usual "what is still open" queries."""
    return mapped_column(
        String(16),
        server_default=text(f"'{initial}'"),
        index=True,
        info=rule.info,
        comment=f"One of: {', '.join(rule.choices)}",
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        uuid.UUID: UUID(as_uuid=True),
        datetime: DateTime(timezone=True),
        float: Double(),
        dict[str, Any]: JSONB(),
    }


class Keyed:
    """A UUIDv7 key generated in Python before insert; a client may also supply it."""

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, default=new_id, sort_order=-1, comment="Time-ordered UUIDv7, generated before insert"
    )


class Timestamped:
    """When the row reached the primary and was last changed there (not when it was observed)."""

    created_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), info=MANAGED, sort_order=100, comment="When the row was written to the primary"
    )
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(),
        onupdate=func.now(),
        info=MANAGED,
        sort_order=101,
        comment="When the row was last changed on the primary",
    )


class Instrument(Keyed, Timestamped, Base):
    """A telescope instrument (receiver, camera); rarely edited planning data."""

    __tablename__ = "instrument"
    __table_args__ = {"comment": "Telescope instruments"}

    name: Mapped[str] = mapped_column(String(64), unique=True, comment="Short unique name, e.g. CHAI")
    description: Mapped[str | None] = mapped_column(Text, comment="Free text")
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"), comment="False once retired")


class InstrumentModule(Keyed, Timestamped, Base):
    """A part of an instrument that observes and reports housekeeping on its own (e.g. one receiver band)."""

    __tablename__ = "instrument_module"
    __table_args__ = (UniqueConstraint("instrument_id", "name"), {"comment": "Modules of an instrument"})

    instrument_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instrument.id"), comment="Instrument it belongs to")
    name: Mapped[str] = mapped_column(String(64), comment="Name, unique within the instrument")
    description: Mapped[str | None] = mapped_column(Text, comment="Free text")
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"), comment="False once retired")


class ObsUnit(Keyed, Timestamped, Base):
    """A planned observation: what to point at, for which program, how urgently."""

    __tablename__ = "obs_unit"
    __table_args__ = (
        UniqueConstraint("program", "name"),
        RIGHT_ASCENSION.check("ra_deg"),
        DECLINATION.check("dec_deg"),
        PRIORITY.check("priority"),
        json_object("parameters"),
        {"comment": "Planned observations"},
    )

    name: Mapped[str] = mapped_column(String(128), comment="Name, unique within the program")
    program: Mapped[str] = mapped_column(String(64), index=True, comment="Observing program (project) code")
    source_name: Mapped[str] = mapped_column(String(128), index=True, comment="Target source name")
    ra_deg: Mapped[float] = mapped_column(info=RIGHT_ASCENSION.info, comment="Right ascension (ICRS), degrees, [0, 360)")
    dec_deg: Mapped[float] = mapped_column(info=DECLINATION.info, comment="Declination (ICRS), degrees, [-90, 90]")
    priority: Mapped[int] = mapped_column(
        SmallInteger, server_default=text("5"), info=PRIORITY.info, comment="Scheduling priority, 1 (highest) to 10"
    )
    parameters: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("'{}'::jsonb"), comment="Open-ended observing setup (scan pattern, tuning, ...)"
    )


class ExecutedObsUnit(Keyed, Timestamped, Base):
    """One execution of an obs_unit on one instrument module; written at the site while it runs."""

    __tablename__ = "executed_obs_unit"
    __table_args__ = (
        EXECUTION_STATUS.check("status"),
        CheckConstraint("end_time >= start_time", name="end_after_start"),
        json_object("metadata"),
        Index(None, "instrument_module_id", "start_time"),
        {"comment": "Observations as executed"},
    )

    obs_unit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("obs_unit.id"), index=True, comment="What was planned")
    instrument_module_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instrument_module.id"), comment="Module that observed")
    status: Mapped[str] = status_column(EXECUTION_STATUS, initial="running")
    start_time: Mapped[datetime] = mapped_column(index=True, comment="Start of the execution (UTC)")
    end_time: Mapped[datetime | None] = mapped_column(comment="End of the execution (UTC); empty while running")
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", server_default=text("'{}'::jsonb"), comment="Open-ended execution details (weather, logs, ...)"
    )


class RawDataPackage(Keyed, Timestamped, Base):
    """Groups the raw files of one executed observation for transfer and archiving."""

    __tablename__ = "raw_data_package"
    __table_args__ = (
        PACKAGE_STATUS.check("status"),
        NON_NEGATIVE.check("size_bytes"),
        SHA256.check("checksum_sha256"),
        {"comment": "Packages of raw data files"},
    )

    name: Mapped[str] = mapped_column(String(255), unique=True, comment="Unique package (archive file) name")
    executed_obs_unit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executed_obs_unit.id"), index=True, comment="Observation whose files it holds"
    )
    status: Mapped[str] = status_column(PACKAGE_STATUS, initial="open")
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, info=NON_NEGATIVE.info, comment="Package size, bytes; known once sealed")
    checksum_sha256: Mapped[str | None] = mapped_column(
        String(64), info=SHA256.info, comment="SHA-256 of the package, lowercase hex; known once sealed"
    )


class RawDataFile(Keyed, Timestamped, Base):
    """A raw data file written by an instrument during an executed observation."""

    __tablename__ = "raw_data_file"
    __table_args__ = (
        NON_NEGATIVE.check("size_bytes"),
        SHA256.check("checksum_sha256"),
        {"comment": "Raw data files"},
    )

    path: Mapped[str] = mapped_column(String(1024), unique=True, comment="Path at the site, unique")
    size_bytes: Mapped[int] = mapped_column(BigInteger, info=NON_NEGATIVE.info, comment="File size, bytes")
    checksum_sha256: Mapped[str] = mapped_column(String(64), info=SHA256.info, comment="SHA-256, lowercase hex")
    file_type: Mapped[str] = mapped_column(String(32), index=True, comment="Format, e.g. fits, hdf5, log")
    executed_obs_unit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executed_obs_unit.id"), index=True, comment="Observation that wrote it"
    )
    raw_data_package_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("raw_data_package.id"), index=True, comment="Package it was put in; empty until packaged"
    )


class HousekeepingSample(Keyed, Base):
    """One reading of an instrument sensor; high rate, so narrow and without bookkeeping columns."""

    __tablename__ = "housekeeping_sample"
    __table_args__ = (
        UniqueConstraint("instrument_module_id", "sensor", "sampled_at"),
        {"comment": "Instrument sensor readings"},
    )

    instrument_module_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instrument_module.id"), comment="Module the sensor belongs to")
    sensor: Mapped[str] = mapped_column(String(64), comment="Sensor name, e.g. mixer_temperature")
    sampled_at: Mapped[datetime] = mapped_column(index=True, comment="Time of the reading (UTC)")
    value: Mapped[float] = mapped_column(comment="Reading, in the given unit")
    unit: Mapped[str | None] = mapped_column(String(16), comment="Unit, e.g. K, mbar, V; empty if dimensionless")


class SyncLedger(Base):
    """Exactly-once apply: one row per envelope, written in the same DB transaction as its data."""

    __tablename__ = "sync_ledger"
    __table_args__ = {"comment": "Envelopes applied to the primary"}

    txn_id: Mapped[uuid.UUID] = mapped_column(primary_key=True, comment="Envelope txn_id (UUIDv7)")
    site: Mapped[str] = mapped_column(String(64), comment="Site that accepted the envelope")
    applied_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), index=True, comment="Start of the DB transaction that applied it"
    )
    db_txid: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("(pg_current_xact_id())::text::bigint"),
        comment="PostgreSQL transaction id (xid8) that applied it",
    )


class RowChange(Base):
    """Change capture: which rows of an ingestible table a PostgreSQL transaction changed.

    Written by statement-level triggers (migration 0002) whoever writes, so the read model also
    sees rows written at the main site with plain SQL; read by :mod:`opsync.read_model.changes`.
    """

    __tablename__ = "row_change"
    __table_args__ = {"comment": "Change capture of the ingestible tables (read-model publisher)"}

    xid: Mapped[int] = mapped_column(
        BigInteger,
        primary_key=True,
        server_default=text("(pg_current_xact_id())::text::bigint"),
        comment="PostgreSQL transaction id (xid8) that changed the row",
    )
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True, comment="Order within the transaction")
    table_name: Mapped[str] = mapped_column(String(63), comment="Ingestible table of the row")
    row_id: Mapped[uuid.UUID] = mapped_column(comment="Key of the changed row")
    op: Mapped[str] = mapped_column(String(6), comment="INSERT, UPDATE or DELETE")
    changed_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), index=True, comment="Start of the changing transaction; retention is by this time"
    )


class RowChangeHorizon(Base):
    """One row: changes below this xid may be purged, so a reader whose position is older must resync."""

    __tablename__ = "row_change_horizon"
    __table_args__ = (CheckConstraint("singleton", name="singleton"), {"comment": "How far row_change has been purged"})

    singleton: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"), comment="Always true: one row")
    purged_below: Mapped[int] = mapped_column(
        BigInteger, server_default=text("0"), comment="Changes of transactions below this xid may have been purged"
    )


class ApiToken(Keyed, Base):
    """Bearer tokens of scripts; only the SHA-256 of a token is stored, so a leak of this table is harmless."""

    __tablename__ = "api_token"
    __table_args__ = (
        SHA256.check("token_sha256"),
        CheckConstraint("expires_at > created_at", name="expires_after_created"),
        {"comment": "API tokens (hashes only)"},
    )

    name: Mapped[str] = mapped_column(String(128), unique=True, comment="Who or what uses the token")
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, comment="SHA-256 of the token, lowercase hex")
    scopes: Mapped[list[str]] = mapped_column(
        ARRAY(String(64)), server_default=text("'{}'"), comment="Grants, e.g. write:raw_data_file, read:obs_unit"
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When the token was issued")
    expires_at: Mapped[datetime | None] = mapped_column(comment="Invalid from then on; empty = never")
    revoked_at: Mapped[datetime | None] = mapped_column(comment="When it was revoked; empty = not revoked")
    last_used_at: Mapped[datetime | None] = mapped_column(comment="Last successful authentication")
