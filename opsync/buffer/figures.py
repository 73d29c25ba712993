"""How full and how far behind the site buffer is: one measurement shared by /metrics, /readyz,
backpressure (whose high-water rule, :mod:`opsync.stats`, judges it), the CLI and the Airflow UI.

Depth counts transactions not yet acknowledged by the drainer (delivered-but-pending plus not yet
delivered): the counter :attr:`Keys.unsent` that the enqueue, acknowledge and requeue scripts
keep. Ages use Redis' own clock, the one that stamped the stream IDs.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, final

import redis
import redis.asyncio as aioredis

from opsync.buffer.scripts import CAPACITY_READING

if TYPE_CHECKING:
    from opsync.buffer import Buffer


@dataclass(frozen=True)
class Fill:
    """How full the buffer is: all backpressure looks at."""

    depth: int  # transactions not yet acknowledged by the drainer
    used_memory: int  # bytes Redis uses
    maxmemory: int  # Redis' limit in bytes; 0 when none is set

    @property
    def memory_fraction(self) -> float | None:
        return self.used_memory / self.maxmemory if self.maxmemory else None


@final  # no subclass may be falsy: ``stats and stats.depth`` is a figure or None
@dataclass(frozen=True)
class BufferStats(Fill):
    pending: int  # of the depth, claimed by a drainer (being applied or to be redelivered)
    oldest_age_s: float  # age of the oldest unacknowledged transaction; 0 when none
    awaiting_replica: int  # committed in the primary, not yet replayed by the local replica
    dead_letters: int  # failed permanently
    last_drain_s: float | None = None  # seconds since the last drain that finished; None: never
    last_confirm_s: float | None = None  # seconds since the last confirmation against the replica
    # The same moments as Unix times (Redis' clock), for Prometheus' ``*_timestamp_seconds``; None: no such event.
    oldest_at: float | None = None  # when the oldest unacknowledged transaction was buffered
    last_drain_at: float | None = None
    last_confirm_at: float | None = None


async def fill(client: aioredis.Redis, buffer: "Buffer") -> Fill:
    """:class:`Fill` in one round trip on an asyncio client: the ingest API measures it on its event
    loop, where a thread would contend for the GIL with the requests."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(buffer.unsent)
        pipe.info("memory")
        unsent, memory = await pipe.execute()
    return Fill(depth=int(unsent or 0), used_memory=memory["used_memory"], maxmemory=memory["maxmemory"])


def buffer_stats(client: redis.Redis, buffer: "Buffer") -> BufferStats:
    """Two round trips whatever the buffer's size: no scan, no XLEN-per-consumer."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.xinfo_groups(buffer.stream)
    pipe.get(buffer.unsent)
    pipe.zcard(buffer.awaiting_replica)
    pipe.xlen(buffer.dead_letters)
    pipe.info("memory")
    pipe.hgetall(buffer.activity)
    now, groups, unsent, awaiting, dead, memory, activity = pipe.execute(raise_on_error=False)
    for result in (now, unsent, awaiting, dead, memory, activity):
        if isinstance(result, Exception):
            raise result
    group = _group(groups, buffer.group)
    depth = int(unsent or 0)
    oldest = _oldest_id(client, buffer, group) if depth else None
    clock = now[0] + now[1] / 1e6
    drain_at, confirm_at = _epoch(activity.get(b"drain_at")), _epoch(activity.get(b"confirm_at"))
    return BufferStats(
        depth=depth,
        pending=group["pending"] if group else 0,
        oldest_age_s=max(0.0, clock - _id_seconds(oldest)) if oldest else 0.0,
        awaiting_replica=awaiting,
        dead_letters=dead,
        used_memory=memory["used_memory"],
        maxmemory=memory["maxmemory"],
        last_drain_s=_since(drain_at, clock),
        last_confirm_s=_since(confirm_at, clock),
        oldest_at=_id_seconds(oldest) if oldest else None,
        last_drain_at=drain_at,
        last_confirm_at=confirm_at,
    )


def _epoch(moment: bytes | None) -> float | None:
    return None if moment is None else datetime.fromisoformat(moment.decode()).timestamp()


def _since(moment: float | None, clock: float) -> float | None:
    return None if moment is None else max(0.0, clock - moment)


def _group(groups, name: str) -> dict | None:
    """The drainers' group; a missing stream answers XINFO with an error, which means no group."""
    if isinstance(groups, Exception):
        if isinstance(groups, redis.ResponseError) and "no such key" in str(groups):
            return None
        raise groups
    return next((g for g in groups if g["name"].decode() == name), None)


def _oldest_id(client: redis.Redis, buffer: "Buffer", group: dict | None) -> bytes | None:
    """Pending entries are older than undelivered ones, so the oldest pending one wins when any exists."""
    if group and group["pending"]:
        return client.xpending(buffer.stream, buffer.group)["min"]
    start = b"(" + group["last-delivered-id"] if group else "-"
    first = client.xrange(buffer.stream, min=start, count=1)
    return first[0][0] if first else None  # type: ignore[return-value]  # bytes: no decode_responses


def _id_seconds(stream_id: bytes) -> float:
    return int(stream_id.split(b"-")[0]) / 1000


def capacity_reading(buffer: "Buffer", window_s: float, every_s: float) -> list:
    """Read the counters :mod:`opsync.monitoring.capacity` forecasts from, in one script (``capacity_reading.lua``), leaving a
    reading at most every ``every_s`` and none older than ``window_s``: (this reading, the window's readings,
    ``maxmemory``, the kept bytes-per-transaction measure as a flat list)."""
    keys = [buffer.stream, buffer.unsent, buffer.awaiting_replica, buffer.drain_totals, buffer.capacity_readings, buffer.capacity_bytes]
    return buffer.client.register_script(CAPACITY_READING)(keys=keys, args=[window_s, every_s])
