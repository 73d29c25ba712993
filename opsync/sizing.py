"""How much Redis memory an outage needs, from the bytes per transaction measured by ``make bench-buffer-memory``.

A finished transaction keeps its status and idempotency record for the status TTL (7 days), so an
outage soon after another one finds Redis already holding the first one's finished transactions:
the memory high-water mark (a share of ``maxmemory`` of Redis' ``used_memory``) counts them, and
the arithmetic here does too.
"""

from opsync.buffer.figures import Fill
from opsync.config import Settings

# Measured on this machine (bench/buffer_memory.py, 50,000 single-record housekeeping transactions with
# idempotency keys, as opsync.client posts them): Redis used_memory per transaction.
BUFFERED_TXN_BYTES = 1_177  # buffered: stream entry, status and idempotency record (bucketed), overlay row, index buckets
KEPT_TXN_BYTES = 265  # after confirmation, until the status TTL: status and idempotency record (bucketed)


def maxmemory_for(entries: int, kept: int, memory_fraction: float) -> int:
    """The ``maxmemory`` under which ``entries`` transactions can be buffered while ``kept`` finished ones
    are still kept, before the memory high-water mark (``memory_fraction`` of it) refuses writes."""
    return round((entries * BUFFERED_TXN_BYTES + kept * KEPT_TXN_BYTES) / memory_fraction)


def room(fill: Fill, settings: Settings, bytes_per_txn: float = BUFFERED_TXN_BYTES) -> int:
    """How many more single-record transactions the buffer takes before a high-water mark refuses them:
    the memory already used (finished transactions kept for their TTL included) counts; without a
    ``maxmemory`` only the entries mark does. ``bytes_per_txn``: a figure measured live (opsync.monitoring.capacity)."""
    by_entries = settings.high_water_entries - fill.depth
    if not fill.maxmemory:
        return max(0, by_entries)
    free = settings.high_water_memory_fraction * fill.maxmemory - fill.used_memory
    return max(0, min(by_entries, int(free // bytes_per_txn)))
