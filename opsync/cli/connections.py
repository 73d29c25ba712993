"""The CLI's connections to the primary, the replica and the site buffer, each with short timeouts and its
failures turned into one clear line and an exit code (5 unreachable, 1 refused) instead of a traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from opsync.buffer import Buffer
from opsync.cli.common import Unavailable
from opsync.config import get_settings
from opsync.lsn import ReplicaError

CONNECT_TIMEOUT_S = 10  # the primary is across the WAN: slow is normal, but never hang
REDIS_TIMEOUT_S = 5  # Redis is local to the site: an answer takes milliseconds


def first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def database(role: str, **options: Any) -> Iterator[Engine]:
    """The primary or the replica (``role``), with failures turned into one clear line instead of a traceback:
    unreachable exits 5, refused exits 1; the URL shown never has the password. Nest the primary inside the
    replica: an unknown replay position (:class:`ReplicaError`) is the replica's alone."""
    url = make_url(getattr(get_settings(), f"{role}_url").get_secret_value())
    engine = create_engine(url, **({"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} | options))
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
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )
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


def measuring_engine(url: str) -> Engine:
    """A fresh connection per measurement (no pool): a link that died between two refreshes cannot hang one."""
    return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
