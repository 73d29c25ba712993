"""Change capture by each table's own key column, not an assumed ``id``.

The trigger function now reads the key column from its trigger's argument, which
``op.capture_changes(table, key=...)`` passes (opsync.migration_ops). Capture triggers installed
without one (an opsync 0.1 database, where every captured table was keyed by ``id``) are recreated
with their table's primary-key column, found in the catalog. The scopes comment of api_token no
longer names tables of a domain.

Revision ID: engine_0002
Revises: engine_0001
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from opsync.migration_ops import create_triggers, drop_triggers

revision: str = "engine_0002"
down_revision: str | None = "engine_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BY_ARGUMENT = """
CREATE OR REPLACE FUNCTION opsync_capture_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  key text := TG_ARGV[0];  -- the table's key column, from op.capture_changes
BEGIN
  IF TG_OP = 'INSERT' THEN
    EXECUTE format('INSERT INTO row_change (table_name, row_id, op) SELECT $1, %I, $2 FROM new_rows', key)
      USING TG_TABLE_NAME, TG_OP;
  ELSIF TG_OP = 'UPDATE' THEN
    -- both keys: an update may change the key itself
    EXECUTE format('INSERT INTO row_change (table_name, row_id, op) SELECT $1, k, $2'
                   ' FROM (SELECT %1$I AS k FROM new_rows UNION SELECT %1$I FROM old_rows) AS changed', key)
      USING TG_TABLE_NAME, TG_OP;
  ELSE
    EXECUTE format('INSERT INTO row_change (table_name, row_id, op) SELECT $1, %I, $2 FROM old_rows', key)
      USING TG_TABLE_NAME, TG_OP;
  END IF;
  RETURN NULL;
END
$$
"""

BY_ID = """
CREATE OR REPLACE FUNCTION opsync_capture_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO row_change (table_name, row_id, op) SELECT TG_TABLE_NAME, id, TG_OP FROM new_rows;
  ELSIF TG_OP = 'UPDATE' THEN
    INSERT INTO row_change (table_name, row_id, op)
    SELECT TG_TABLE_NAME, id, TG_OP FROM (SELECT id FROM new_rows UNION SELECT id FROM old_rows) AS changed;
  ELSE
    INSERT INTO row_change (table_name, row_id, op) SELECT TG_TABLE_NAME, id, TG_OP FROM old_rows;
  END IF;
  RETURN NULL;
END
$$
"""

WITHOUT_ARGUMENT = """
SELECT DISTINCT c.relname, a.attname
FROM pg_trigger t
JOIN pg_proc p ON p.oid = t.tgfoid AND p.proname = 'opsync_capture_changes'
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
WHERE t.tgnargs = 0
"""


def upgrade() -> None:
    op.execute(BY_ARGUMENT)
    for table, key in op.get_bind().execute(sa.text(WITHOUT_ARGUMENT)).all():
        for statement in [*drop_triggers(table), *create_triggers(table, key)]:
            op.execute(statement)
    op.alter_column("api_token", "scopes", comment="Grants, e.g. write:<table>, read:<table>")


def downgrade() -> None:
    """Back to reading ``id``: the triggers keep their argument, which that function ignores."""
    op.execute(BY_ID)
