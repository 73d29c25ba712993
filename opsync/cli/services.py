"""The CLI's connections to the primary, the replica and the site buffer, each with short timeouts and its
failures turned into one clear line and an exit code (5 unreachable, 1 refused) instead of a traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from opsync import connections
from opsync.buffer import Buffer
from opsync.cli.common import Unavailable
from opsync.config import get_settings
from opsync.connections import Database
from opsync.errors import one_line
from opsync.lsn import ReplicaError


def first_line(exc: BaseException) -> str:
    """The driver's own error (SQLAlchemy wraps it) in one line."""
    return one_line(getattr(exc, "orig", None) or exc)


@contextmanager
def database(role: str, **options: Any) -> Iterator[Engine]:
    """The primary or the replica (``role``), with failures turned into one clear line instead of a traceback:
    unreachable exits 5, refused exits 1; the URL shown never has the password. Nest the primary inside the
    replica: an unknown replay position (:class:`ReplicaError`) is the replica's alone."""
    settings = get_settings()
    url = connections.database_url(settings, Database(role))
    engine = connections.engine(settings, Database(role), connections.background_timeouts(settings), **options)
    unreachable = (OperationalError, ReplicaError) if role == "replica" else OperationalError
    try:
        yield engine
    except unreachable as exc:
        where = url.render_as_string(hide_password=True)
        raise Unavailable(f"cannot reach the {role} ({where}): {first_line(exc)}") from None
    except DBAPIError as exc:
        raise click.ClickException(f"the {role} refused: {first_line(exc)}") from None
    finally:
        engine.dispose()


def site_buffer() -> Buffer:
    """The site buffer with short timeouts: an unreachable Redis must end in a message, not a hang."""
    settings = get_settings()
    client = connections.redis_client(settings)
    return Buffer(client, idempotency_ttl_s=settings.idempotency_ttl_s, status_ttl_s=settings.status_ttl_s)


@contextmanager
def buffer_or_exit() -> Iterator[Buffer]:
    """The site buffer, with Redis failures turned into one clear line: unreachable exits 5, refused exits 1."""
    buffer = site_buffer()
    try:
        yield buffer
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unavailable(f"cannot reach the site buffer (Redis): {exc}") from None
    except redis.RedisError as exc:
        raise click.ClickException(f"the site buffer (Redis) refused: {exc}") from None
    finally:
        buffer.client.close()


def measuring_engine(database: Database) -> Engine:
    """A fresh connection per measurement (no pool): a link that died between two refreshes cannot hang one."""
    settings = get_settings()
    return connections.engine(settings, database, connections.background_timeouts(settings), pool=False)
