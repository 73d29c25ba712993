"""The engine's tables: the sync ledger, API tokens, change capture (row_change, its horizon, the trigger function).

Domains install capture on their tables with ``op.capture_changes`` (opsync.migration_ops); the
function records which rows each transaction changed, whoever wrote them: the drainer, a direct
write, or someone at the main site with plain SQL. The row values are not copied: the read-model
publisher re-reads changed rows from the replica (see opsync.read_model.changes for why reading this table up
to the snapshot's xmin misses nothing). This revision is the engine's part of an opsync 0.1 database
at revision ``0002`` exactly (the function still reads the key as ``id``; revision engine_0002 lifts
that). Self-contained: no import of opsync.schema.

Revision ID: engine_0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "engine_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("engine",)
depends_on: str | Sequence[str] | None = None

SHA256 = "~ '^[0-9a-f]{64}$'"
TIMESTAMPTZ = sa.DateTime(timezone=True)
XID = "(pg_current_xact_id())::text::bigint"

CAPTURE = """
CREATE FUNCTION opsync_capture_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO row_change (table_name, row_id, op) SELECT TG_TABLE_NAME, id, TG_OP FROM new_rows;
  ELSIF TG_OP = 'UPDATE' THEN
    -- both keys: an update may change the key itself
    INSERT INTO row_change (table_name, row_id, op)
    SELECT TG_TABLE_NAME, id, TG_OP FROM (SELECT id FROM new_rows UNION SELECT id FROM old_rows) AS changed;
  ELSE
    INSERT INTO row_change (table_name, row_id, op) SELECT TG_TABLE_NAME, id, TG_OP FROM old_rows;
  END IF;
  RETURN NULL;
END
$$
"""


def key() -> sa.Column:
    return sa.Column("id", sa.UUID(), nullable=False, comment="Time-ordered UUIDv7, generated before insert")


def check(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    op.create_table(
        "sync_ledger",
        sa.Column("txn_id", sa.UUID(), nullable=False, comment="Envelope txn_id (UUIDv7)"),
        sa.Column("site", sa.String(64), nullable=False, comment="Site that accepted the envelope"),
        sa.Column(
            "applied_at",
            TIMESTAMPTZ,
            server_default=sa.text("now()"),
            nullable=False,
            comment="Start of the DB transaction that applied it",
        ),
        sa.Column(
            "db_txid",
            sa.BigInteger(),
            server_default=sa.text("(pg_current_xact_id())::text::bigint"),
            nullable=False,
            comment="PostgreSQL transaction id (xid8) that applied it",
        ),
        sa.PrimaryKeyConstraint("txn_id", name=op.f("pk_sync_ledger")),
        comment="Envelopes applied to the primary",
    )
    index("sync_ledger", "applied_at")
    op.create_table(
        "api_token",
        key(),
        sa.Column("name", sa.String(128), nullable=False, comment="Who or what uses the token"),
        sa.Column("token_sha256", sa.String(64), nullable=False, comment="SHA-256 of the token, lowercase hex"),
        sa.Column(
            "scopes",
            ARRAY(sa.String(64)),
            server_default=sa.text("'{}'"),
            nullable=False,
            comment="Grants, e.g. write:<table>, read:<table>",
        ),
        sa.Column(
            "created_at",
            TIMESTAMPTZ,
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the token was issued",
        ),
        sa.Column("expires_at", TIMESTAMPTZ, nullable=True, comment="Invalid from then on; empty = never"),
        sa.Column("revoked_at", TIMESTAMPTZ, nullable=True, comment="When it was revoked; empty = not revoked"),
        sa.Column("last_used_at", TIMESTAMPTZ, nullable=True, comment="Last successful authentication"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("name", name=op.f("uq_api_token_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_token_token_sha256")),
        check("api_token", "token_sha256", f"token_sha256 {SHA256}"),
        check("api_token", "expires_after_created", "expires_at > created_at"),
        comment="API tokens (hashes only)",
    )
    op.create_table(
        "row_change",
        sa.Column(
            "xid",
            sa.BigInteger(),
            server_default=sa.text(XID),
            nullable=False,
            comment="PostgreSQL transaction id (xid8) that changed the row",
        ),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False, comment="Order within the transaction"),
        sa.Column("table_name", sa.String(63), nullable=False, comment="Ingestible table of the row"),
        sa.Column("row_id", sa.UUID(), nullable=False, comment="Key of the changed row"),
        sa.Column("op", sa.String(6), nullable=False, comment="INSERT, UPDATE or DELETE"),
        sa.Column(
            "changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="Start of the changing transaction; retention is by this time",
        ),
        sa.PrimaryKeyConstraint("xid", "seq", name=op.f("pk_row_change")),
        comment="Change capture of the ingestible tables (read-model publisher)",
    )
    op.create_index(op.f("ix_row_change_changed_at"), "row_change", ["changed_at"])
    op.create_table(
        "row_change_horizon",
        sa.Column("singleton", sa.Boolean(), server_default=sa.text("true"), nullable=False, comment="Always true: one row"),
        sa.Column(
            "purged_below",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Changes of transactions below this xid may have been purged",
        ),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_row_change_horizon")),
        sa.CheckConstraint("singleton", name=op.f("ck_row_change_horizon_singleton")),
        comment="How far row_change has been purged",
    )
    op.execute("INSERT INTO row_change_horizon DEFAULT VALUES")
    op.execute(CAPTURE)


def downgrade() -> None:
    op.execute("DROP FUNCTION opsync_capture_changes()")
    op.drop_table("row_change_horizon")
    op.drop_table("row_change")
    op.drop_table("api_token")
    op.drop_table("sync_ledger")
