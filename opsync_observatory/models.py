"""The observatory's operations data: instruments, planned and executed observations, raw data, housekeeping.

Keys are UUIDv7 generated at the site (:class:`opsync.schema.Keyed`), so a row can be referenced by
later steps while it is still buffered. Each ingestible model declares how it travels in
``__opsync__`` (:class:`opsync.domain.Ingest`); the migrations in ``migrations/`` create exactly
these tables (tests/test_schema.py compares them).
"""

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from opsync.domain import Ingest, Mode
from opsync.schema import MANAGED, NAMING_CONVENTION, SHA256, TYPE_ANNOTATIONS, Keyed, Rule

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
    """The domain's own metadata: its migrations and the engine's stay apart; named and typed as the engine's."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = TYPE_ANNOTATIONS


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
    __opsync__: ClassVar[Ingest] = Ingest(Mode.direct, facets=("active",))
    __table_args__ = {"comment": "Telescope instruments"}

    name: Mapped[str] = mapped_column(String(64), unique=True, comment="Short unique name, e.g. CHAI")
    description: Mapped[str | None] = mapped_column(Text, comment="Free text")
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"), comment="False once retired")


class InstrumentModule(Keyed, Timestamped, Base):
    """A part of an instrument that observes and reports housekeeping on its own (e.g. one receiver band)."""

    __tablename__ = "instrument_module"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.direct, facets=("instrument_id", "active"))
    __table_args__ = (UniqueConstraint("instrument_id", "name"), {"comment": "Modules of an instrument"})

    instrument_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instrument.id"), comment="Instrument it belongs to")
    name: Mapped[str] = mapped_column(String(64), comment="Name, unique within the instrument")
    description: Mapped[str | None] = mapped_column(Text, comment="Free text")
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"), comment="False once retired")


class ObsUnit(Keyed, Timestamped, Base):
    """A planned observation: what to point at, for which program, how urgently."""

    __tablename__ = "obs_unit"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.direct, deletable=True, facets=("program",))
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
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, facets=("status", "instrument_module_id"), night_of="start_time")
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
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, facets=("status",))
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
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, deletable=True, facets=("file_type", "raw_data_package_id"))
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
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, facets=("sensor", "instrument_module_id"))
    __table_args__ = (
        UniqueConstraint("instrument_module_id", "sensor", "sampled_at"),
        {"comment": "Instrument sensor readings"},
    )

    instrument_module_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instrument_module.id"), comment="Module the sensor belongs to")
    sensor: Mapped[str] = mapped_column(String(64), comment="Sensor name, e.g. mixer_temperature")
    sampled_at: Mapped[datetime] = mapped_column(index=True, comment="Time of the reading (UTC)")
    value: Mapped[float] = mapped_column(comment="Reading, in the given unit")
    unit: Mapped[str | None] = mapped_column(String(16), comment="Unit, e.g. K, mbar, V; empty if dimensionless")
