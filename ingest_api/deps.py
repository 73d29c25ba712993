"""Shared dependencies of the routes: one Redis client per process, built from the settings."""

from functools import lru_cache

import redis

from opsync.config import get_settings


@lru_cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url.get_secret_value(), socket_timeout=5)
