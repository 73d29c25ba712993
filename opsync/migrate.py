"""Bring a primary's schema to a revision; the one entry point for ``opsync migrate``, ``make up`` and the tests.

Two Alembic branches in two folders: the engine's (``migrations/versions``, label ``engine``) and
the configured domain's (its package's ``migrations``, depending on the engine's first revision).
A database of opsync 0.1 (one line of revisions, at ``0002``) holds exactly the engine's first
revision and the domain's ``legacy_revision`` (which depends on it, so Alembic counts that alone as
the head): it is stamped there first, then upgraded.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, inspect, text

from opsync import domain

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
LEGACY = "0002"  # the last revision of opsync 0.1, whose migrations held engine and domain together


def alembic_config(url: str) -> Config:
    """An Alembic Config built in code, so no ``alembic.ini`` or working directory is needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    locations = [MIGRATIONS / "versions", domain.current().migrations]
    config.set_main_option("version_locations", " ".join(str(location) for location in locations))
    config.set_main_option("path_separator", "space")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "heads") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def adopt_legacy(conn: Connection) -> None:
    """Stamp an opsync 0.1 database (revision ``0002``) at the revisions it equals, so an upgrade can go on.

    Called by ``migrations/env.py`` on the migration's own connection, before Alembic reads the
    current revision, so a bare ``alembic upgrade heads`` adopts it too.
    """
    if not inspect(conn).has_table("alembic_version"):
        return
    if conn.scalars(text("SELECT version_num FROM alembic_version")).all() != [LEGACY]:
        return
    current = domain.current()
    if current.legacy_revision is None:
        raise RuntimeError(f"the database is at opsync 0.1's revision {LEGACY}, which domain {current.name!r} cannot adopt")
    conn.execute(text("UPDATE alembic_version SET version_num = :domain"), {"domain": current.legacy_revision})
