"""Hooks: the site buffer and the two databases, from Airflow connections (``AIRFLOW_CONN_*`` under ``make up``).

Built on the Redis and Postgres providers' hooks, so connections are managed in Airflow's UI or
secrets backend like any other, and nothing here knows a URL or a password. The clients and
engines are made by :mod:`opsync.connections`, with the timeouts every face of opsync shares; TLS
comes from the connection's extras as each provider reads them, on every path (engines, the
buffer, and the triggers' asyncio connections): libpq keywords for Postgres
(``{"sslmode": "verify-full", "sslrootcert": "/etc/opsync/primary-ca.pem"}``), redis-py's for
Redis (``{"ssl": true, "ssl_ca_certs": "/etc/opsync/redis-ca.pem"}``).
"""

from typing import Any

import psycopg
import redis
import redis.asyncio as aioredis
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.providers.redis.hooks.redis import RedisHook
from airflow.sdk import Connection
from sqlalchemy import Engine

from opsync import connections
from opsync.buffer import Buffer
from opsync.config import get_settings
from opsync.connections import Timeouts

BUFFER_CONN_ID = "opsync_buffer"
PRIMARY_CONN_ID = "opsync_primary"
REPLICA_CONN_ID = "opsync_replica"
BUFFER_PREFIX = "opsync"  # the ingest API's key prefix
REDIS_SSL_EXTRAS = ("ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_keyfile", "ssl_certfile", "ssl_check_hostname")  # RedisHook's


class SiteBufferHook(RedisHook):
    """The site buffer (a Redis connection) as an :class:`opsync.buffer.Buffer`, or an asyncio client for the triggers."""

    default_conn_name = BUFFER_CONN_ID
    hook_name = "opsync site buffer"

    def __init__(self, redis_conn_id: str = BUFFER_CONN_ID, prefix: str = BUFFER_PREFIX) -> None:
        super().__init__(redis_conn_id=redis_conn_id)
        self.prefix = prefix

    def get_conn(self) -> redis.Redis:
        """:class:`RedisHook`'s client, with the buffer's timeouts (the provider's has redis-py's defaults)."""
        if self.redis is None:
            conn = self.get_connection(self.redis_conn_id)
            self.redis = redis.Redis(**redis_fields(conn, conn.extra_dejson, connections.buffer_timeouts(get_settings())))
        return self.redis

    async def aget_client(self, timeouts: Timeouts) -> aioredis.Redis:
        """An asyncio client; the connection is fetched without blocking the triggerer's loop."""
        conn = await self.aget_connection(self.redis_conn_id)
        return aioredis.Redis(**redis_fields(conn, await conn.aextra_dejson(), timeouts))

    def get_buffer(self) -> Buffer:
        settings = get_settings()
        return Buffer(
            self.get_conn(),
            prefix=self.prefix,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            status_ttl_s=settings.status_ttl_s,
        )


def redis_fields(conn: Connection, extra: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
    """``redis.Redis`` keywords of a Redis connection, its fields and extras read as :meth:`RedisHook.get_conn` reads them."""
    password = None if str(conn.password).lower() in ("none", "false", "") else conn.password
    fields = {"host": conn.host, "port": conn.port, "username": conn.login or None, "password": password, "db": extra.get("db") or 0}
    return connections.redis_params(timeouts, **fields, **{name: extra[name] for name in REDIS_SSL_EXTRAS if name in extra})


class SiteDatabaseHook(PostgresHook):
    """The primary or the replica (a Postgres connection) as a SQLAlchemy engine on psycopg 3, or an asyncio connection.

    :func:`opsync.apply.apply_batch` drives psycopg 3's pipeline mode and relies on a connect timeout;
    the engine is made with :func:`opsync.connections.engine_options`, which keep a new connection's
    round trips few. Extras that :meth:`PostgresHook.get_conn` hands to libpq (``sslmode`` and the
    like) and the ``sqlalchemy_query`` extra reach libpq on every path.
    """

    default_conn_name = PRIMARY_CONN_ID
    hook_name = "opsync database"

    def __init__(self, postgres_conn_id: str = PRIMARY_CONN_ID, connect_timeout_s: int | None = None) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id, sqlalchemy_scheme="postgresql+psycopg")
        self.timeouts = Timeouts(connect_timeout_s or get_settings().connect_timeout_s)

    def get_engine(self, autocommit: bool = False) -> Engine:
        """``autocommit`` only for an engine that serves :func:`opsync.apply.apply_batch` alone (see :func:`engine_options`)."""
        tls = self.libpq_extras(self.connection.extra_dejson)
        return self.get_sqlalchemy_engine(connections.engine_options(self.timeouts, tls, autocommit=autocommit))

    async def aget_conn(self) -> psycopg.AsyncConnection:
        """An autocommit asyncio connection for triggers; the connection is fetched without blocking the triggerer's loop."""
        conn = await self.aget_connection(self.postgres_conn_id)
        fields = {"host": conn.host, "port": conn.port, "user": conn.login, "password": conn.password}
        params = {name: value for name, value in (fields | {"dbname": self.database or conn.schema}).items() if value is not None}
        return await connections.aconnect(params | self.libpq_extras(await conn.aextra_dejson()), self.timeouts)

    def libpq_extras(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The extras libpq gets: what :meth:`PostgresHook.get_conn` passes on, and ``sqlalchemy_query`` (the engines' URL query)."""
        return {name: value for name, value in extra.items() if name not in self.ignored_extra_options} | extra.get("sqlalchemy_query", {})
