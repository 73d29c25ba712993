"""The site buffer: a Redis stream of transactions plus their status, written atomically; the one owner of the
site's Redis keys and of the scripts that change them.

One Lua script writes the stream entry, the status record, the idempotency record, the overlay
of the rows it touches and the state-change event, so no half-written transaction can exist, and
a retried request with the same ``Idempotency-Key`` gets the original answer without writing
anything. The stream is the source of truth for the drainer; the pub/sub event is only a wake-up
and may be lost. The scripts touch keys they compute, so they need a single Redis (no cluster),
which a site has.

Where each part lives:

- :mod:`~opsync.buffer.keys`: every key's name (nothing outside this package spells one);
- ``lua/`` and :mod:`~opsync.buffer.scripts`: the Lua scripts, as files;
- :mod:`~opsync.buffer.write`: enqueue, idempotency, statuses;
- :mod:`~opsync.buffer.stream`: the drainer's claim, settle and confirm, and the dead letters;
- :mod:`~opsync.buffer.read`: the overlay and the stream as the merged view and the publisher read them;
- :mod:`~opsync.buffer.records`: the compact formats of idempotency records and statuses;
- :mod:`~opsync.buffer.codec`: the one envelope codec (its Lua half: ``lua/envelope.lua``);
- :mod:`~opsync.buffer.figures`: how full and how far behind the buffer is.

Records of the earlier layouts (idempotency strings and hashes of their own, replicated statuses kept
whole, indexes as one sorted set, envelopes with named fields) are still read.
"""

import redis

from opsync.buffer.read import Reads
from opsync.buffer.records import (
    IDEMPOTENCY_BUCKETS,
    IDEMPOTENCY_WINDOWS,
    encode,
    final_status,
    idempotency_field,
    pack_response,
    travelling_status,
    unpack_response,
)
from opsync.buffer.scripts import CONFIRM, DISCARD, ENQUEUE, INDEX_RANGE, OVERLAY_EXISTS, REQUEUE, SETTLE
from opsync.buffer.stream import CLAIM_PAGE, Drains, Entry, Settlement, settle_chunks
from opsync.buffer.write import (
    AsyncEnqueuer,
    Enqueued,
    IdempotencyConflict,
    NoSuchRow,
    UnknownRows,
    Writes,
    answered_within,
    involved_tables,
    tables_field,
    tables_of,
)

__all__ = [
    "CLAIM_PAGE",
    "CONFIRM",
    "DISCARD",
    "ENQUEUE",
    "IDEMPOTENCY_BUCKETS",
    "IDEMPOTENCY_WINDOWS",
    "OVERLAY_EXISTS",
    "REQUEUE",
    "SETTLE",
    "AsyncEnqueuer",
    "Buffer",
    "Enqueued",
    "Entry",
    "IdempotencyConflict",
    "NoSuchRow",
    "Settlement",
    "UnknownRows",
    "answered_within",
    "encode",
    "final_status",
    "idempotency_field",
    "involved_tables",
    "pack_response",
    "settle_chunks",
    "tables_field",
    "tables_of",
    "travelling_status",
    "unpack_response",
]


class Buffer(Writes, Drains, Reads):
    """The durable queue at the site; keys live under one prefix so several sites can share a test Redis."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "opsync",
        idempotency_ttl_s: int = 7 * 86400,
        status_ttl_s: int = 7 * 86400,
        idempotency_buckets: int = IDEMPOTENCY_BUCKETS,
    ):
        self.client = client
        self.idempotency_buckets_per_window = idempotency_buckets
        self.prefix = prefix
        self.idempotency_ttl_s = idempotency_ttl_s
        self.status_ttl_s = status_ttl_s
        self._enqueue = client.register_script(ENQUEUE)
        self._settle = client.register_script(SETTLE)
        self._confirm = client.register_script(CONFIRM)
        self._requeue = client.register_script(REQUEUE)
        self._discard = client.register_script(DISCARD)
        self._index_range = client.register_script(INDEX_RANGE)
        self._overlay_exists = client.register_script(OVERLAY_EXISTS)
