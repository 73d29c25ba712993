"""Change capture records any key as text: a table may be keyed by a natural key the client gives.

``row_change.row_id`` becomes ``text`` (a UUID key is recorded in its canonical spelling, as readers
already read it, ``row_id::text``); the capture function casts each key to text itself. Downgrading
is possible only while every recorded key is a UUID.

Revision ID: engine_0003
Revises: engine_0002
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "engine_0003"
down_revision: str | None = "engine_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AS_TEXT = """
CREATE OR REPLACE FUNCTION opsync_capture_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  key text := TG_ARGV[0];  -- the table's key column, from op.capture_changes
BEGIN
  IF TG_OP = 'INSERT' THEN
    EXECUTE format('INSERT INTO row_change (table_name, row_id, op) SELECT $1, %I::text, $2 FROM new_rows', key)
      USING TG_TABLE_NAME, TG_OP;
  ELSIF TG_OP = 'UPDATE' THEN
    -- both keys: an update may change the key itself
    EXECUTE format('INSERT INTO row_change (table_name, row_id, op) SELECT $1, k, $2'
                   ' FROM (SELECT %1$I::text AS k FROM new_rows UNION SELECT %1$I::text FROM old_rows) AS changed', key)
      USING TG_TABLE_NAME, TG_OP;
  ELSE
    EXECUTE format('INSERT INTO row_change (table_name, row_id, op) SELECT $1, %I::text, $2 FROM old_rows', key)
      USING TG_TABLE_NAME, TG_OP;
  END IF;
  RETURN NULL;
END
$$
"""

AS_UUID = AS_TEXT.replace("::text", "")


def upgrade() -> None:
    op.execute("ALTER TABLE row_change ALTER COLUMN row_id TYPE text USING row_id::text")
    op.execute(AS_TEXT)


def downgrade() -> None:
    op.execute("ALTER TABLE row_change ALTER COLUMN row_id TYPE uuid USING row_id::uuid")
    op.execute(AS_UUID)
