"""Backpressure: above the high-water mark, writes get ``503`` with ``Retry-After``; nothing is evicted.

One measurement of the buffer serves every request for ``backpressure_cache_s``, so the check
costs a clock read per request, not Redis round trips.
"""

import time

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from ingest_api.deps import get_buffer
from opsync.buffer import Buffer
from opsync.config import Settings, get_settings
from opsync.stats import buffer_stats, high_water


def measure(buffer: Buffer, settings: Settings) -> str | None:
    """Why writes must be refused now (None: accept); raises RedisError when the buffer is unreachable."""
    stats = buffer_stats(buffer.client, buffer)
    return high_water(stats, settings.high_water_entries, settings.high_water_memory_fraction)


class Pressure:
    """The last measurement, valid for one cache period and for the buffer and settings it was made with."""

    def __init__(self):
        self.basis: tuple[Buffer, Settings] | None = None
        self.at = float("-inf")
        self.reason: str | None = None

    async def current(self) -> str | None:
        buffer, settings = get_buffer(), get_settings()
        now = time.monotonic()
        same_basis = self.basis is not None and self.basis[0] is buffer and self.basis[1] is settings
        if not same_basis or now - self.at >= settings.backpressure_cache_s:
            self.reason = await run_in_threadpool(measure, buffer, settings)
            self.basis, self.at = (buffer, settings), now
        return self.reason


pressure = Pressure()


async def check_backpressure() -> None:
    """Dependency of the write routes."""
    reason = await pressure.current()
    if reason:
        retry_after = get_settings().retry_after_s
        raise HTTPException(503, f"{reason}; retry later", headers={"Retry-After": str(retry_after)})
