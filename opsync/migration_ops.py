"""Alembic operations the engine gives every domain's migrations: ``op.capture_changes(table, key=...)``.

Change capture (the ``row_change`` table the read-model publisher follows, see :mod:`opsync.read_model.changes`)
is installed per ingestible table by the domain's own migration, so the engine's migrations name no
domain table. Statement-level AFTER triggers with transition tables cost one ``INSERT ... SELECT``
per statement, whoever writes (the drainer, a direct write, plain SQL at the main site); each
trigger passes its table's key column to ``opsync_capture_changes()`` (engine revision 0002).
Imported by ``migrations/env.py``, which registers the operations before any migration runs.
"""

from typing import Any

from alembic.operations import MigrateOperation, Operations

FUNCTION = "opsync_capture_changes"
TRANSITIONS = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}


def identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier (works offline too, where no connection could quote it)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_triggers(table: str, key: str) -> list[str]:
    """The three capture triggers of ``table``, each handing ``key`` (its key column) to the function."""
    return [
        f"CREATE TRIGGER opsync_capture_{event} AFTER {event.upper()} ON {identifier(table)} {transition}"
        f" FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}({literal(key)})"
        for event, transition in TRANSITIONS.items()
    ]


def drop_triggers(table: str) -> list[str]:
    return [f"DROP TRIGGER opsync_capture_{event} ON {identifier(table)}" for event in TRANSITIONS]


@Operations.register_operation("capture_changes")
class CaptureChanges(MigrateOperation):
    """Record every insert, update and delete on ``table`` in ``row_change``, by its ``key`` column."""

    def __init__(self, table: str, key: str) -> None:
        self.table, self.key = table, key

    @classmethod
    def capture_changes(cls, operations: Operations, table: str, key: str) -> Any:
        return operations.invoke(cls(table, key))

    def reverse(self) -> "DropCapture":
        return DropCapture(self.table, self.key)


@Operations.register_operation("drop_capture")
class DropCapture(MigrateOperation):
    """Stop capturing ``table``'s changes (dropping the table drops its triggers too)."""

    def __init__(self, table: str, key: str) -> None:
        self.table, self.key = table, key

    @classmethod
    def drop_capture(cls, operations: Operations, table: str, key: str) -> Any:
        return operations.invoke(cls(table, key))

    def reverse(self) -> CaptureChanges:
        return CaptureChanges(self.table, self.key)


@Operations.implementation_for(CaptureChanges)
def capture_changes(operations: Operations, operation: CaptureChanges) -> None:
    for statement in create_triggers(operation.table, operation.key):
        operations.execute(statement)


@Operations.implementation_for(DropCapture)
def drop_capture(operations: Operations, operation: DropCapture) -> None:
    for statement in drop_triggers(operation.table):
        operations.execute(statement)
