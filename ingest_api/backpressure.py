"""Backpressure: above the high-water mark, writes get ``503`` with ``Retry-After``; nothing is evicted.

One measurement of the buffer serves every request for ``backpressure_cache_s``, so the check
costs a clock read per request, not Redis round trips; and the next one is made while the last
still answers.
"""

import asyncio
import time

from fastapi import HTTPException

from ingest_api.deps import get_buffer, get_enqueuer
from opsync.buffer import Buffer, answered_within
from opsync.buffer.figures import fill
from opsync.config import Settings, get_settings
from opsync.stats import high_water

STALE_PERIODS = 4  # a verdict up to this many cache periods old still answers while a new one is measured


class Pressure:
    """The last measurement, valid for one cache period and for the buffer and settings it was made with."""

    def __init__(self):
        self.basis: tuple[Buffer, Settings] | None = None
        self.at = float("-inf")
        self.reason: str | None = None
        self._measuring: asyncio.Future | None = None

    async def current(self) -> str | None:
        """The verdict, measured at most once per cache period (single flight: hundreds of requests
        arrive meanwhile at 1,000 per second). Past its period the old verdict still answers while a
        new measurement runs, so no request waits for one; only a verdict older than ``STALE_PERIODS``
        periods, or none for this buffer and settings yet, is waited for."""
        basis = (get_buffer(), get_settings())
        age = self.age(basis)
        period = basis[1].backpressure_cache_s
        if age >= period:
            measuring = self.measuring(basis)
            if age >= period * STALE_PERIODS:
                await asyncio.shield(measuring)
        return self.reason

    def age(self, basis: tuple[Buffer, Settings]) -> float:
        same = self.basis is not None and self.basis[0] is basis[0] and self.basis[1] is basis[1]
        return time.monotonic() - self.at if same else float("inf")

    def measuring(self, basis: tuple[Buffer, Settings]) -> asyncio.Future:
        running = self._measuring
        if running is None or running.done() or running.get_loop() is not asyncio.get_running_loop():
            running = self._measuring = asyncio.ensure_future(self.measure(basis))
            running.add_done_callback(lambda done: done.cancelled() or done.exception())  # the waiters get it
        return running

    async def measure(self, basis: tuple[Buffer, Settings]) -> None:
        enqueuer = get_enqueuer()
        async with answered_within(enqueuer.timeout_s):
            level = await fill(enqueuer.client, basis[0])
        self.reason = high_water(level, basis[1])
        self.basis, self.at = basis, time.monotonic()


pressure = Pressure()


async def check_backpressure() -> None:
    """Dependency of the write routes."""
    reason = await pressure.current()
    if reason:
        retry_after = get_settings().retry_after_s
        raise HTTPException(503, f"{reason}; retry later", headers={"Retry-After": str(retry_after)})
