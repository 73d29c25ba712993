"""Which tables scripts may write, and how.

A new ingestible table is one model, one migration and one line in :data:`REGISTRY`: admission
(:mod:`opsync.admission`) derives its rules from the model's columns and constraints.
:func:`python_type` types the merged view's filter values.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, AwareDatetime, Field
from sqlalchemy import BigInteger, Column, Integer, SmallInteger, Table, UniqueConstraint
from sqlalchemy.sql.sqltypes import JSON

from opsync import schema


class Mode(StrEnum):
    critical = "critical"  # always buffered at the site: must never block or be lost
    direct = "direct"  # rare planning edits, written straight to the primary


class UnknownTable(LookupError):
    """The name is not an ingestible table (it may not exist, or be internal like the ledger)."""


@dataclass(frozen=True)
class Ingestible:
    """One ingestible table: where it lives and how it travels."""

    table: Table
    mode: Mode
    deletable: bool

    @property
    def name(self) -> str:
        return self.table.name

    @cached_property  # derived from the table, which never changes: once per process, not per request
    def insert_defaults(self) -> dict[str, Any]:
        """Literal server defaults, written into buffered inserts so the merged view shows them at once."""
        return literal_defaults(self.table)

    @cached_property
    def filterable(self) -> tuple[str, ...]:
        """Columns the merged view filters on by equality: indexed in the primary and in the buffer overlay."""
        return filterable_columns(self.table)


def python_type(column: Column) -> Any:
    """The type of a filter value on a column: its SQL type narrowed by its length and :class:`Rule`."""
    rule: schema.Rule | None = column.info.get("rule")
    if rule is not None and rule.choices:
        return Literal[rule.choices]
    if isinstance(column.type, JSON):
        base: Any = dict[str, Any]
    elif column.type.python_type is datetime:
        base = Annotated[AwareDatetime, AfterValidator(loadable)]  # a naive time is ambiguous (site local or UTC?): refuse it
    else:
        base = column.type.python_type
    constraints = {"max_length": getattr(column.type, "length", None)}
    if rule is not None:
        constraints |= {"ge": rule.ge, "le": rule.le, "lt": rule.lt, "pattern": rule.pattern}
    constraints = integer_range(column) | {name: value for name, value in constraints.items() if value is not None}
    return Annotated[base, Field(**constraints)] if constraints else base


def integer_range(column: Column) -> dict[str, int]:
    """What the column's integer type holds: a larger number would only be refused by the primary, hours later."""
    for sql_type, bits in ((BigInteger, 63), (SmallInteger, 15), (Integer, 31)):
        if isinstance(column.type, sql_type):
            return {"ge": -(2**bits), "le": 2**bits - 1}
    return {}


def loadable(value: datetime) -> datetime:
    """PostgreSQL accepts times past the year 9999 in UTC, but psycopg (the drainer, every reader) cannot load them.

    Only a time in the year 1 or 9999 can leave the range by its offset; the conversion that
    tells is checked for those alone (it costs more than the rest of a record's validation).
    """
    if value.year in (1, 9999):
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError("out of range: in UTC it must fall within the years 1 to 9999") from None
    return value


def filterable_columns(table: Table) -> tuple[str, ...]:
    """References and other indexed columns whose values are worth an equality filter.

    Times, floats and JSON are left out (equality on them is not a query anyone makes), and so is
    the key (a row is fetched by its key directly).
    """
    indexed = {column.key for index in table.indexes for column in index.columns}
    indexed |= {column.key for c in table.constraints if isinstance(c, UniqueConstraint) for column in c.columns}
    indexed |= {column.key for column in table.columns if column.foreign_keys}
    return tuple(
        column.key
        for column in table.columns
        if column.key in indexed
        and not column.primary_key
        and not isinstance(column.type, JSON)
        and column.type.python_type not in (datetime, float)
    )


def literal_defaults(table: Table) -> dict[str, Any]:
    """Server defaults that are constants (``'running'``, ``5``, ``true``, ``'{}'::jsonb``), as JSON values.

    Defaults computed by the database (``now()``) are left to it.
    """
    defaults = {}
    for column in input_columns(table):
        sql = getattr(getattr(column.server_default, "arg", None), "text", None)
        if sql is None:
            continue
        literal = sql.split("::")[0]
        if literal.startswith("'") and literal.endswith("'"):
            inner = literal[1:-1].replace("''", "'")
            defaults[column.key] = json.loads(inner) if isinstance(column.type, JSON) else inner
        else:
            try:
                defaults[column.key] = json.loads(literal)
            except ValueError:  # an expression such as now() or gen_random_uuid()
                continue
    return defaults


def has_default(column: Column) -> bool:
    return column.default is not None or column.server_default is not None


def input_columns(table: Table) -> list[Column]:
    """Columns a client may set: all but those the database manages (created_at, updated_at)."""
    return [column for column in table.columns if not column.info.get("managed")]


def ingestible(model: type[schema.Base], mode: Mode, deletable: bool) -> Ingestible:
    table = cast(Table, model.__table__)  # typed FromClause for mapping a join; our models map tables
    return Ingestible(table, mode, deletable)


REGISTRY: dict[str, Ingestible] = {
    entry.name: entry
    for entry in (
        ingestible(schema.Instrument, Mode.direct, deletable=False),
        ingestible(schema.InstrumentModule, Mode.direct, deletable=False),
        ingestible(schema.ObsUnit, Mode.direct, deletable=True),
        ingestible(schema.ExecutedObsUnit, Mode.critical, deletable=False),
        ingestible(schema.RawDataPackage, Mode.critical, deletable=False),
        ingestible(schema.RawDataFile, Mode.critical, deletable=True),
        ingestible(schema.HousekeepingSample, Mode.critical, deletable=False),
    )
}


def get_table(name: str) -> Ingestible:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownTable(f"{name!r} is not an ingestible table; known: {', '.join(sorted(REGISTRY))}") from None


def ingestible_tables(mode: Mode | None = None) -> list[Ingestible]:
    """All ingestible tables (or those of one mode), parents before children (FK order)."""
    ordered = [REGISTRY[table.name] for table in schema.Base.metadata.sorted_tables if table.name in REGISTRY]
    return [entry for entry in ordered if mode in (None, entry.mode)]
