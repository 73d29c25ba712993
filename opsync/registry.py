"""Which tables scripts may write, and how: the configured domain's models that declare ``__opsync__``.

A new ingestible table is one model with its :class:`~opsync.domain.Ingest` declaration and one
migration in the domain package (:mod:`opsync.domain`); admission (:mod:`opsync.admission`) derives
its rules from the model's columns and constraints. :func:`python_type` types the merged view's
filter values. A table is refused here, at import, when the site could not make its rows' keys.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal, cast
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, Field
from sqlalchemy import BigInteger, Column, Integer, SmallInteger, String, Table, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.sql.sqltypes import JSON, Uuid

from opsync import domain, schema
from opsync.domain import Ingest, Key, Mode
from opsync.read_model.tables import ENGINE_TABLES

__all__ = ["Ingest", "Ingestible", "Key", "Mode", "Unregistrable", "UnknownTable", "get_table", "ingestible_tables"]


class Unregistrable(ValueError):
    """A domain table the engine cannot carry, with the reason naming the table and column."""


class UnknownTable(LookupError):
    """The name is not an ingestible table (it may not exist, or be internal like the ledger)."""


@dataclass(frozen=True)
class Ingestible:
    """One ingestible table: where it lives and how it travels."""

    table: Table
    mode: Mode
    deletable: bool
    key_source: Key = Key.site
    facets: tuple[str, ...] = ()
    night_of: str | None = None

    @property
    def name(self) -> str:
        return self.table.name

    @cached_property  # on every request's path: found once
    def key(self) -> Column:
        """The key column, read from the model (checked single and carriable by :func:`key_column`)."""
        return key_column(self.table)

    @cached_property
    def uuid_key(self) -> bool:
        """Whether keys are UUIDs (spelt canonically, bucketed by time); else a natural key the client gives."""
        return isinstance(self.key.type, Uuid)

    def key_of(self, text: str) -> UUID | str:
        """A key as buffers and JSON spell it (text) in the column's own type, for queries."""
        return UUID(text) if self.uuid_key else text

    @cached_property
    def key_order(self) -> Any:
        """The key as rows are sorted by it: a natural key in byte order (``COLLATE "C"``), as the buffer's sorted
        sets and Python's ``sorted`` order it, whatever the database's collation."""
        return self.key if self.uuid_key else self.key.collate("C")

    @cached_property
    def key_sql(self) -> str:
        """The SQL type of a key array's element (``uuid`` or ``text``): the drain and readers cast to it."""
        return "uuid" if self.uuid_key else "text"

    @cached_property
    def key_type(self) -> Any:
        """The Python type a key is validated as (a step's id, a path parameter, a cursor): the column's, with its limits."""
        if self.uuid_key:
            return UUID
        return Annotated[str, Field(min_length=1, max_length=self.key.type.length)]  # type: ignore[attr-defined]  # a String

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
    """Columns a client may set: all but those the database manages (``info=MANAGED``: stamped by the primary)."""
    return [column for column in table.columns if not column.info.get("managed")]


def key_column(table: Table) -> Column:
    """The table's one key column, or :class:`Unregistrable` when the site could not make its keys.

    Rows are written at the site while the primary is out of reach, and later steps reference a
    new row by its key at once: a key only the primary can make (serial, identity, a server
    default) is refused. A UUID key may be made at the site; any other key is a natural one the
    client gives (text, for now), and the table must say so (``Key.client``).
    """
    keys = list(table.primary_key.columns)
    if len(keys) != 1:
        raise Unregistrable(f"table {table.name}: opsync needs a single-column key, not ({', '.join(c.name for c in keys)})")
    key = keys[0]
    if (
        key.identity is not None
        or key.server_default is not None
        or key.autoincrement is True
        or (key.autoincrement == "auto" and isinstance(key.type, Integer) and key.default is None)
    ):
        raise Unregistrable(
            f"table {table.name}: key column {key.name} is generated by the primary (serial/identity/server default),"
            " which the site cannot reach while the link is down; use a UUID made at the site or a key the client gives"
        )
    if not isinstance(key.type, Uuid | String):
        raise Unregistrable(f"table {table.name}: key column {key.name} is {key.type}; opsync carries UUID or text keys")
    return key


def ingestible(model: type[DeclarativeBase]) -> Ingestible:
    """The registry entry a model declares in ``__opsync__``, once its key is known to be one the site can make."""
    table = cast(Table, model.__table__)  # typed FromClause for mapping a join; our models map tables
    declared: Ingest = model.__opsync__  # type: ignore[attr-defined]
    key = key_column(table)
    if not isinstance(key.type, Uuid) and declared.key is not Key.client:
        raise Unregistrable(
            f"table {table.name}: key column {key.name} is {key.type}, which only a client can give: declare Ingest(key=Key.client)"
        )
    unknown = [name for name in (*declared.facets, declared.night_of or "") if name and name not in table.columns]
    if unknown:
        raise Unregistrable(f"table {table.name}: __opsync__ names no such column: {', '.join(unknown)}")
    return Ingestible(table, declared.mode, declared.deletable, declared.key, declared.facets, declared.night_of)


def engine_table_names() -> frozenset[str]:
    """The engine's own tables: in the primary (ledger, change capture, tokens) and in the read model (figures, state)."""
    return frozenset(schema.Base.metadata.tables) | frozenset(ENGINE_TABLES)


def refuse_engine_names(base: type[DeclarativeBase]) -> None:
    """A domain table named like one of the engine's would share the primary's or the read model's table with it."""
    taken = sorted(set(base.metadata.tables) & engine_table_names())
    if taken:
        raise Unregistrable(f"table {', '.join(taken)}: the name is taken by the engine's own table; rename the domain's")


def registrations(base: type[DeclarativeBase]) -> dict[str, Ingestible]:
    """Every model of the domain that declares ``__opsync__``, parents before children (FK order)."""
    refuse_engine_names(base)
    models = {cast(Table, m.local_table).name: m.class_ for m in base.registry.mappers if "__opsync__" in vars(m.class_)}
    ordered = [table.name for table in base.metadata.sorted_tables if table.name in models]
    return {name: ingestible(models[name]) for name in ordered}


REGISTRY: dict[str, Ingestible] = registrations(domain.current().base)


def get_table(name: str) -> Ingestible:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownTable(f"{name!r} is not an ingestible table; known: {', '.join(sorted(REGISTRY))}") from None


def ingestible_tables(mode: Mode | None = None) -> list[Ingestible]:
    """All ingestible tables (or those of one mode), parents before children (FK order)."""
    return [entry for entry in REGISTRY.values() if mode in (None, entry.mode)]
