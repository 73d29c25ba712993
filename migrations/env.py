"""Alembic environment: the engine's models (opsync.schema) and the configured domain's are the target.

The URL comes from the Config (``opsync.migrate.alembic_config``, used by ``make up`` and the
tests) or, for a bare ``alembic`` command, from the opsync settings (``OPSYNC_PRIMARY_URL``).
Importing :mod:`opsync.migration_ops` registers ``op.capture_changes`` for the domain's migrations;
an opsync 0.1 database is stamped at its new revisions first (:func:`opsync.migrate.adopt_legacy`).
"""

from alembic import context
from sqlalchemy import create_engine

import opsync.migration_ops  # noqa: F401  registers the engine's migration operations
from opsync import connections, domain
from opsync.config import get_settings
from opsync.connections import Database
from opsync.migrate import adopt_legacy
from opsync.schema import Base

COMPARE = {"compare_type": True, "compare_server_default": True}
TARGET = [Base.metadata, domain.current().base.metadata]


def database_url() -> str:
    return context.config.get_main_option("sqlalchemy.url") or get_settings().primary_url.get_secret_value()


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: the DDL as a script, to review or hand to a DBA."""
    context.configure(url=database_url(), target_metadata=TARGET, literal_binds=True, **COMPARE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    settings = get_settings()  # the primary's timeouts and TLS, whichever URL is migrated
    tls = connections.postgres_tls(settings, Database.primary)
    engine = create_engine(database_url(), **connections.engine_options(connections.background_timeouts(settings), tls, pool=False))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=TARGET, **COMPARE)
        with context.begin_transaction():
            adopt_legacy(connection)
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
