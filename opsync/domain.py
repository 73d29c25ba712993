"""A domain: the site's own tables, plugged into the engine as one package.

The engine names no table of a domain. A domain package declares its models (each ingestible
one carries an :class:`Ingest` as ``__opsync__``), its Alembic migrations, its Datasette
metadata and its read-model extras in one :class:`Domain`, published under the ``opsync.domains``
entry-point group; the setting ``OPSYNC_DOMAIN`` picks one by name (default ``observatory``, the
domain opsync ships in :mod:`opsync_observatory`).
"""

from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from sqlalchemy.orm import DeclarativeBase

from opsync.config import get_settings

GROUP = "opsync.domains"


class Mode(StrEnum):
    critical = "critical"  # always buffered at the site: must never block or be lost
    direct = "direct"  # rare planning edits, written straight to the primary


class Key(StrEnum):
    """Who makes a new row's key: never the primary, which the site cannot reach while the link is down."""

    site = "site"  # a UUIDv7 generated at ingest when the client sends none
    client = "client"  # the client always sends it (e.g. a natural key)


@dataclass(frozen=True)
class Ingest:
    """How one table travels, declared on its model as ``__opsync__``."""

    mode: Mode
    deletable: bool = False
    key: Key = Key.site
    facets: tuple[str, ...] = ()  # columns readers facet on: the read model indexes them
    night_of: str | None = None  # a time column: the read model derives the observing night it falls in


@dataclass(frozen=True)
class Examples:
    """The domain's rows the API's OpenAPI page shows (the engine names none)."""

    table: str  # an ingestible table
    transaction: dict[str, Any]  # a POST /v1/transactions body
    record: dict[str, Any]  # a POST /v1/records/{table} row of ``table``
    update: dict[str, Any]  # a PATCH body


@dataclass(frozen=True)
class Domain:
    """Everything the engine needs of a domain; built once in the domain package."""

    name: str
    base: type[DeclarativeBase]  # the models' declarative base; ingestible models carry ``__opsync__``
    migrations: Path  # the domain's Alembic versions folder (its own branch, depending on the engine's)
    datasette_metadata: Path  # Datasette metadata: titles, column descriptions, facets, canned queries, dashboards
    examples: Examples
    legacy_revision: str | None = None  # the domain's revision (depending on engine_0001) that, with it, equals opsync 0.1's 0002
    demo: str | None = None  # ``module:function`` of its demo workload (``make demo``), taking argv, returning an exit code
    workload: str | None = None  # ``module:attribute`` of its soak workload (``make soak``; see devstack.soak.Workload)


class UnknownDomain(LookupError):
    """No installed package publishes a domain of that name."""


def configured_name() -> str:
    """``OPSYNC_DOMAIN`` (environment or ``.env``, as every setting)."""
    return get_settings().domain


def load(name: str) -> Domain:
    """The domain published under ``name`` in the ``opsync.domains`` entry-point group."""
    found = entry_points(group=GROUP, name=name)
    if not found:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=GROUP))) or "none"
        raise UnknownDomain(f"OPSYNC_DOMAIN={name!r}: no installed package publishes that domain ({GROUP} entry points: {known})")
    domain = next(iter(found)).load()
    if not isinstance(domain, Domain):
        raise UnknownDomain(f"the {GROUP} entry point {name!r} is not an opsync.domain.Domain")
    return domain


@cache
def current() -> Domain:
    """The configured domain, loaded once per process."""
    return load(configured_name())
