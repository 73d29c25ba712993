"""Change capture: every insert, update and delete on an ingestible table, stamped with its xid.

Statement-level AFTER triggers (with transition tables, so a COPY or a 10,000-row batch costs one
INSERT ... SELECT, not 10,000) record which rows each transaction changed, whoever wrote them:
the drainer, a direct write, or someone at the main site with plain SQL. The row values are not
copied: the read-model publisher re-reads changed rows from the replica (see opsync.read_model.changes for
why reading this table up to the snapshot's xmin misses nothing).

Self-contained like 0001 (its own table list, no import of opsync.schema).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "instrument",
    "instrument_module",
    "obs_unit",
    "executed_obs_unit",
    "raw_data_package",
    "raw_data_file",
    "housekeeping_sample",
)
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

TRANSITIONS = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}


def upgrade() -> None:
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
    for table in TABLES:
        for event, transition in TRANSITIONS.items():
            op.execute(
                f"CREATE TRIGGER opsync_capture_{event} AFTER {event.upper()} ON {table} {transition}"
                " FOR EACH STATEMENT EXECUTE FUNCTION opsync_capture_changes()"
            )


def downgrade() -> None:
    for table in TABLES:
        for event in TRANSITIONS:
            op.execute(f"DROP TRIGGER opsync_capture_{event} ON {table}")
    op.execute("DROP FUNCTION opsync_capture_changes()")
    op.drop_table("row_change_horizon")
    op.drop_table("row_change")
