"""Hooks: the site buffer and the two databases, from Airflow connections (``AIRFLOW_CONN_*`` under ``make up``).

Built on the Redis and Postgres providers' hooks, so connections are managed in Airflow's UI or
secrets backend like any other, and nothing here knows a URL or a password.
"""

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.providers.redis.hooks.redis import RedisHook
from airflow.sdk.bases.hook import BaseHook
from sqlalchemy import Engine

from opsync.apply import engine_options
from opsync.buffer import Buffer
from opsync.config import get_settings

BUFFER_CONN_ID = "opsync_buffer"
PRIMARY_CONN_ID = "opsync_primary"
REPLICA_CONN_ID = "opsync_replica"
BUFFER_PREFIX = "opsync"  # the ingest API's key prefix
CONNECT_TIMEOUT_S = 10  # a cut link accepts nothing and never refuses: without it a connect hangs for minutes


class SiteBufferHook(RedisHook):
    """The site buffer (a Redis connection) as an :class:`opsync.buffer.Buffer`."""

    default_conn_name = BUFFER_CONN_ID
    hook_name = "opsync site buffer"

    def __init__(self, redis_conn_id: str = BUFFER_CONN_ID, prefix: str = BUFFER_PREFIX) -> None:
        super().__init__(redis_conn_id=redis_conn_id)
        self.prefix = prefix

    def get_buffer(self) -> Buffer:
        settings = get_settings()
        return Buffer(
            self.get_conn(),
            prefix=self.prefix,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            status_ttl_s=settings.status_ttl_s,
        )


class SiteDatabaseHook(PostgresHook):
    """The primary or the replica (a Postgres connection) as a SQLAlchemy engine on psycopg 3.

    :func:`opsync.apply.apply_batch` drives psycopg 3's pipeline mode and relies on a connect timeout;
    the engine is made with :func:`opsync.apply.engine_options`, which keep a new connection's round
    trips few (``sslmode`` and the like come from the connection's ``sqlalchemy_query`` extra).
    """

    default_conn_name = PRIMARY_CONN_ID
    hook_name = "opsync database"

    def __init__(self, postgres_conn_id: str = PRIMARY_CONN_ID, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id, sqlalchemy_scheme="postgresql+psycopg")
        self.connect_timeout_s = connect_timeout_s

    def get_engine(self, autocommit: bool = False) -> Engine:
        """``autocommit`` only for an engine that serves :func:`opsync.apply.apply_batch` alone (see :func:`engine_options`)."""
        return self.get_sqlalchemy_engine(engine_options(self.connect_timeout_s, autocommit))


async def async_connect(conn_id: str, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> psycopg.AsyncConnection:
    """An autocommit psycopg connection for triggers: the connection is fetched without blocking the triggerer's loop."""
    conn = await BaseHook.aget_connection(conn_id)
    conninfo = psycopg.conninfo.make_conninfo(
        host=conn.host,
        port=conn.port,
        user=conn.login,
        password=conn.password,
        dbname=conn.schema,
        connect_timeout=connect_timeout_s,
    )
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
