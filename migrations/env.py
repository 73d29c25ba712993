"""Alembic environment: the models in opsync.schema are the target.

The URL comes from the Config (``opsync.migrate.alembic_config``, used by ``make up`` and the
tests) or, for a bare ``alembic`` command, from the opsync settings (``OPSYNC_PRIMARY_URL``).
"""

from alembic import context
from sqlalchemy import create_engine

from opsync import connections
from opsync.config import get_settings
from opsync.connections import Database
from opsync.schema import Base

COMPARE = {"compare_type": True, "compare_server_default": True}


def database_url() -> str:
    return context.config.get_main_option("sqlalchemy.url") or get_settings().primary_url.get_secret_value()


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: the DDL as a script, to review or hand to a DBA."""
    context.configure(url=database_url(), target_metadata=Base.metadata, literal_binds=True, **COMPARE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    settings = get_settings()  # the primary's timeouts and TLS, whichever URL is migrated
    tls = connections.postgres_tls(settings, Database.primary)
    engine = create_engine(database_url(), **connections.engine_options(connections.background_timeouts(settings), tls, pool=False))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, **COMPARE)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
