"""The engine's own tables on the primary (sync ledger, change capture, API tokens) and the helpers domains share.

A domain's models (:mod:`opsync.domain`) live in its own package with their own declarative base;
they use :data:`NAMING_CONVENTION`, :data:`TYPE_ANNOTATIONS` and :class:`Rule` from here, so their
constraints are named and validated the way the engine expects. Column value rules are declared
once as a :class:`Rule`: the primary enforces them as CHECK constraints, and :mod:`opsync.registry`
turns the same rule into ingest validation, so bad data is refused at the site instead of being
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
    Identity,
    MetaData,
    String,
    Text,
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
TYPE_ANNOTATIONS: dict[Any, Any] = {
    uuid.UUID: UUID(as_uuid=True),
    datetime: DateTime(timezone=True),
    float: Double(),
    dict[str, Any]: JSONB(),
}


class Base(DeclarativeBase):
    """The engine's tables; a domain has a base of its own, so its migrations and metadata stay its own."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = TYPE_ANNOTATIONS


class Keyed:
    """A UUIDv7 key generated in Python before insert; a client may also supply it."""

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, default=new_id, sort_order=-1, comment="Time-ordered UUIDv7, generated before insert"
    )


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

    Written by statement-level triggers (installed per ingestible table by the ``capture_changes``
    migration operation, :mod:`opsync.migration_ops`) whoever writes, so the read model also
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
    row_id: Mapped[str] = mapped_column(Text, comment="Key of the changed row")
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
        ARRAY(String(64)), server_default=text("'{}'"), comment="Grants, e.g. write:<table>, read:<table>"
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When the token was issued")
    expires_at: Mapped[datetime | None] = mapped_column(comment="Invalid from then on; empty = never")
    revoked_at: Mapped[datetime | None] = mapped_column(comment="When it was revoked; empty = not revoked")
    last_used_at: Mapped[datetime | None] = mapped_column(comment="Last successful authentication")
