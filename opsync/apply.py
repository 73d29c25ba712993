"""Applying transaction envelopes to the primary, exactly once.

The ledger row and the data are written in the same database transaction: if the ledger already
holds the ``txn_id``, the envelope was applied before (a redelivery after a crash between commit
and acknowledgement) and is skipped, so redelivery never duplicates.
"""

from typing import Any

from sqlalchemy import Connection, Engine, delete, func, text, update
from sqlalchemy.dialects.postgresql import insert

from opsync import registry
from opsync.envelope import Op, Step, Transaction
from opsync.schema import SyncLedger


class RowNotFound(Exception):
    """An update or delete names a row the primary does not have: a permanent error."""


def apply_transaction(conn: Connection, txn: Transaction) -> bool:
    """Apply inside the caller's DB transaction; False when the ledger says it is already applied."""
    claimed = conn.execute(
        insert(SyncLedger).values(txn_id=txn.txn_id, site=txn.site).on_conflict_do_nothing().returning(SyncLedger.txn_id)
    ).first()
    if claimed is None:
        return False
    for step in txn.steps:
        apply_step(conn, step)
    return True


def apply_step(conn: Connection, step: Step) -> None:
    entry = registry.get_table(step.table)
    table = entry.table
    if step.op is Op.delete:
        result = conn.execute(delete(table).where(table.c.id == step.key))
    elif step.op is Op.update:
        values = typed(entry.update_model, step.values) | touched(table)
        result = conn.execute(update(table).where(table.c.id == step.key).values(values))
    else:
        values = typed(entry.create_model, {**step.values, "id": step.key})
        statement = insert(table).values(values)
        if step.op is Op.upsert:
            changes = {k: v for k, v in values.items() if k != "id"} | touched(table)
            statement = statement.on_conflict_do_update(index_elements=[table.c.id], set_=changes)
        result = conn.execute(statement)
    if result.rowcount == 0:
        raise RowNotFound(f"{step.op} of {step.table} {step.key}: no such row")


def typed(model, values: dict[str, Any]) -> dict[str, Any]:
    """JSON values back to Python values (datetimes, UUIDs) through the registry's model."""
    return model.model_validate(values).model_dump(exclude_unset=True)


def touched(table) -> dict[str, Any]:
    """``updated_at`` is refreshed by every change (raw inserts and updates bypass the ORM's onupdate)."""
    return {"updated_at": func.now()} if "updated_at" in table.c else {}


def commit(engine: Engine, txn: Transaction) -> str:
    """Apply one envelope in its own DB transaction and return the commit LSN.

    The LSN is read on the same connection right after the commit, so it is at or past the
    commit record: once a replica has replayed it, the transaction is there.
    """
    with engine.connect() as conn:
        with conn.begin():
            apply_transaction(conn, txn)
        return conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
