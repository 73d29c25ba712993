"""Dependencies of the routes: clients built once per process from the settings, and auth."""

from functools import lru_cache
from typing import Annotated

import redis
from fastapi import Depends, Header, HTTPException
from sqlalchemy import Engine, create_engine

from opsync.auth import AuthError, Principal, TokenVerifier
from opsync.buffer import Buffer
from opsync.config import Settings, get_settings


@lru_cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url.get_secret_value(), socket_timeout=5)


@lru_cache
def get_buffer() -> Buffer:
    settings = get_settings()
    return Buffer(get_redis(), idempotency_ttl_s=settings.idempotency_ttl_s, status_ttl_s=settings.status_ttl_s)


def engine_for(url: str, timeout_s: int) -> Engine:
    """Short timeouts: a request must never hang on the intercontinental link."""
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": timeout_s, "options": f"-c statement_timeout={timeout_s * 1000}"},
    )


@lru_cache
def get_primary() -> Engine:
    settings = get_settings()
    return engine_for(settings.primary_url.get_secret_value(), settings.direct_timeout_s)


@lru_cache
def get_verifier() -> TokenVerifier:
    settings = get_settings()
    return TokenVerifier(engine_for(settings.replica_url.get_secret_value(), 3), settings.token_cache_ttl_s)


def principal(
    verifier: Annotated[TokenVerifier, Depends(get_verifier)],
    authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
) -> Principal:
    scheme, _, token = (authorization or "").partition(" ")
    try:
        return verifier.verify(token.strip() if scheme.lower() == "bearer" else None)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


SettingsDep = Annotated[Settings, Depends(get_settings)]
BufferDep = Annotated[Buffer, Depends(get_buffer)]
PrincipalDep = Annotated[Principal, Depends(principal)]
PrimaryDep = Annotated[Engine, Depends(get_primary)]
