"""Every connection opsync makes is built here: the primary, the replica and the buffer Redis, with
their timeouts and TLS, and the main/secondary rule of which database tells what a site can read.

Timeouts go by who waits. An API request (:func:`request_timeouts`) waits seconds at most, on
connect and on each statement. Everything else (the drain, the CLI, the publisher, the triggers:
:func:`background_timeouts`) may be slow but must never hang: the primary is across a WAN whose
cut link accepts nothing and never refuses. Redis is local: longer than :func:`buffer_timeouts`
means it is stuck.

TLS comes from the settings (``OPSYNC_*_SSLMODE``, ``_SSLROOTCERT``, ``OPSYNC_REDIS_SSL_CA_CERTS``
with a ``rediss://`` URL) or, for the Airflow hooks, from the connection's extras; either way it
reaches libpq or redis-py through the functions below. URLs stay ``SecretStr`` until the driver
gets them: an engine's or a client's repr and their connection errors name the server, never the password.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
import redis
import redis.asyncio as aioredis
from redis.maint_notifications import MaintNotificationsConfig
from sqlalchemy import URL, Engine, create_engine, make_url
from sqlalchemy.pool import NullPool

from opsync.config import Settings, SiteType


class Database(StrEnum):
    primary = "primary"
    replica = "replica"


def readable(settings: Settings) -> Database:
    """Where this site reads what is committed: its replica; on the main site the primary itself, where a commit is readable at once."""
    return Database.primary if settings.site_type is SiteType.main else Database.replica


@dataclass(frozen=True)
class Timeouts:
    """``connect_s``: for a new connection; ``answer_s``: for one statement (PostgreSQL ``statement_timeout``)
    or one answer (Redis ``socket_timeout``); None leaves it unbounded, for a caller that bounds it itself."""

    connect_s: float
    answer_s: float | None = None


def request_timeouts(settings: Settings, database: Database) -> Timeouts:
    """An API request waits: direct writes on the primary, token checks and reads on the replica."""
    seconds = settings.direct_timeout_s if database is Database.primary else settings.replica_timeout_s
    return Timeouts(seconds, seconds)


def background_timeouts(settings: Settings) -> Timeouts:
    """The drain, the CLI, the publisher and the triggers: no statement limit (the drain bounds a batch itself)."""
    return Timeouts(settings.connect_timeout_s)


def buffer_timeouts(settings: Settings) -> Timeouts:
    return Timeouts(settings.redis_timeout_s, settings.redis_timeout_s)


# --- PostgreSQL --------------------------------------------------------------------------------------


def postgres_tls(settings: Settings, database: Database) -> dict[str, str]:
    """The libpq TLS parameters the settings give ``database``; they win over the URL's."""
    given = {"sslmode": getattr(settings, f"{database}_sslmode"), "sslrootcert": getattr(settings, f"{database}_sslrootcert")}
    return {name: str(value) for name, value in given.items() if value is not None}


def libpq_params(timeouts: Timeouts, tls: Mapping[str, Any] | None = None, options: str = "") -> dict[str, Any]:
    """psycopg's connection parameters for ``timeouts`` and ``tls`` (any libpq keywords: ``sslmode``, ``sslrootcert``...).

    No GSS encryption attempt: with a Kerberos ticket cache, libpq tries it before anything, a round
    trip (200-500 ms over the WAN) for nothing. ``options`` are server settings (``-c name=value``).
    """
    if timeouts.answer_s is not None:
        options = f"{options} -c statement_timeout={round(timeouts.answer_s * 1000)}".strip()
    params: dict[str, Any] = {"connect_timeout": max(2, round(timeouts.connect_s)), "gssencmode": "disable"}  # libpq: whole s, 2 at least
    params |= dict(tls or {})
    return params | ({"options": options} if options else {})


def engine_options(
    timeouts: Timeouts,
    tls: Mapping[str, Any] | None = None,
    *,
    autocommit: bool = False,
    pool: bool = True,
    pre_ping: bool = False,
    options: str = "",
) -> dict[str, Any]:
    """``create_engine()`` options: :func:`libpq_params`, and no hstore lookup at the first connection (no column is hstore).

    ``autocommit`` spares SQLAlchemy's first-connection checks their BEGIN and ROLLBACK: only for an
    engine that serves :func:`opsync.apply.apply_batch` alone (it sends its own BEGIN and COMMIT),
    since under it ``engine.begin()`` is no transaction. ``pool=False``: a fresh connection each
    time, so a link that died meanwhile cannot hang a pooled one. ``pre_ping``: a pooled connection
    is checked before use, for long-lived engines that outlive restarts.
    """
    return (
        {"connect_args": libpq_params(timeouts, tls, options), "use_native_hstore": False, "pool_pre_ping": pre_ping}
        | ({"isolation_level": "AUTOCOMMIT"} if autocommit else {})
        | ({} if pool else {"poolclass": NullPool})
    )


def database_url(settings: Settings, database: Database) -> URL:
    return make_url(getattr(settings, f"{database}_url").get_secret_value())


def engine(settings: Settings, database: Database, timeouts: Timeouts, **options: Any) -> Engine:
    """An engine on the primary or the replica with the settings' TLS; ``options`` as :func:`engine_options`'."""
    return create_engine(database_url(settings, database), **engine_options(timeouts, postgres_tls(settings, database), **options))


def connect(conninfo: str, timeouts: Timeouts, **params: Any) -> psycopg.Connection:
    """One psycopg connection from a libpq connection string (health checks); ``params`` are more libpq keywords."""
    return psycopg.connect(conninfo, **libpq_params(timeouts, params))


async def aconnect(params: Mapping[str, Any], timeouts: Timeouts) -> psycopg.AsyncConnection:
    """An autocommit asyncio connection from libpq keywords (host, user, password, dbname, TLS...): the triggers'."""
    return await psycopg.AsyncConnection.connect(**libpq_params(timeouts, params), autocommit=True)


# --- Redis (the site buffer) -------------------------------------------------------------------------


def redis_tls(settings: Settings) -> dict[str, Any]:
    return {"ssl_ca_certs": str(settings.redis_ssl_ca_certs)} if settings.redis_ssl_ca_certs else {}


def redis_client(settings: Settings, timeouts: Timeouts | None = None, **options: Any) -> redis.Redis:
    """A client of the site buffer from ``OPSYNC_REDIS_URL``; ``options`` are redis-py's (``retry``...)."""
    timeouts = timeouts or buffer_timeouts(settings)
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=timeouts.connect_s,
        socket_timeout=timeouts.answer_s,
        **redis_tls(settings),
        **options,
    )


def async_redis_client(settings: Settings, timeouts: Timeouts | None = None, **options: Any) -> aioredis.Redis:
    """An asyncio client of the site buffer; ``options`` are redis-py's (``retry``, ``connection_class``...).

    Maintenance notifications are off: redis-py 8.1's asyncio pool skips its check of pooled
    connections when they are "auto", so the first command after a Redis restart would fail.
    """
    timeouts = timeouts or buffer_timeouts(settings)
    return aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=timeouts.connect_s,
        socket_timeout=timeouts.answer_s,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **redis_tls(settings),
        **options,
    )


def redis_params(timeouts: Timeouts, **params: Any) -> dict[str, Any]:
    """``redis.Redis(...)`` keywords for ``timeouts`` and ``params`` (host, port, db, password, ``ssl``, ``ssl_ca_certs``...):
    the Airflow hooks', whose connections are fields and extras rather than a URL."""
    return params | {"socket_connect_timeout": timeouts.connect_s, "socket_timeout": timeouts.answer_s}
