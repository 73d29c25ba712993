"""Every Redis key of a site, under its prefix: the one place a key is spelled (the Lua scripts build the ones
they compute from the same prefix, in this package too).

A test (``tests/test_buffer_keys.py``) fails when code outside :mod:`opsync.buffer` spells one, so the layout
of the buffer can change here without a reader elsewhere going stale.
"""

import time
import zlib

from opsync.buffer.records import IDEMPOTENCY_WINDOWS, encode, idempotency_field

BUCKET_CHARS = 10  # bytes of a key's text: of a UUID's, 36 bits of its 48-bit millisecond time, ~4 s (see Keys.index_bucket)
GROUP = "drain"  # the stream's one consumer group: the drainers


class Keys:
    """The names of a site's keys; keys live under one prefix so several sites can share a test Redis."""

    prefix: str
    idempotency_ttl_s: int
    idempotency_buckets_per_window: int

    @property
    def stream(self) -> str:
        return f"{self.prefix}:buffer"

    @property
    def events(self) -> str:
        return events_channel(self.prefix)

    @property
    def dead_letters(self) -> str:
        """Stream of transactions that failed permanently, with the database's reason."""
        return f"{self.prefix}:dead"

    @property
    def activity(self) -> str:
        """Hash of when the drainer last finished a drain (``drain_at``) and a confirmation (``confirm_at``)."""
        return f"{self.prefix}:activity"

    @property
    def unsent(self) -> str:
        """Counter of transactions in the stream not yet acknowledged by a drainer (the buffer's depth).

        Kept by the scripts that add and acknowledge entries, because Redis 7.0 stops reporting a
        consumer group's lag once an entry it has not read yet was deleted.
        """
        return f"{self.prefix}:unsent"

    @property
    def awaiting_replica(self) -> str:
        """Sorted set of committed transactions by commit LSN (as a number), until the replica passes them."""
        return f"{self.prefix}:awaiting"

    @property
    def dead_rows(self) -> str:
        """Hash from each row a dead-lettered transaction would have created ('table:key') to that txn_id."""
        return f"{self.prefix}:dead:rows"

    @property
    def dlq_audit(self) -> str:
        """Stream of operators' requeues and discards of dead letters: action, txn_id, by, at, reason."""
        return f"{self.prefix}:dlq:audit"

    @property
    def group(self) -> str:
        """The stream's one consumer group: the drainers."""
        return GROUP

    def status_key(self, txn_id) -> str:
        return f"{self.prefix}:txn:{txn_id}"

    def idempotency_key(self, client_id: str, key: str) -> str:
        return f"{self.prefix}:idem:{client_id}:{key}"

    def idempotency_buckets(self, idempotency: tuple[str, str]) -> tuple[list[str], int]:
        """The bucket hashes that may hold the record of ``idempotency`` (newest window first: a new record goes
        there), and when that bucket expires (ms since the epoch).

        A TTL is :data:`IDEMPOTENCY_WINDOWS` windows; a bucket is one window's records of one of
        ``idempotency_buckets`` hashes of the key (:data:`IDEMPOTENCY_BUCKETS`), and expires as a whole a TTL
        after its window ends, so a
        record lives between the TTL and the TTL plus one window, and a lookup reads one bucket per window that
        may still live (one more than the windows, in the same script or pipeline).
        """
        ttl_ms = self.idempotency_ttl_s * 1000
        window_ms = -(-ttl_ms // IDEMPOTENCY_WINDOWS)
        now = time.time_ns() // 1_000_000 // window_ms
        slot = zlib.crc32(idempotency_field(*idempotency).encode()) % self.idempotency_buckets_per_window
        names = [f"{self.prefix}:idem:#{window}:{slot}" for window in range(now, now - IDEMPOTENCY_WINDOWS - 1, -1)]
        return names, (now + 1) * window_ms + ttl_ms

    def final_key(self, txn_id) -> tuple[str, bytes]:
        """(bucket hash, field) of a replicated transaction's status: the bucket of its 256 ms window of
        acceptance (the time-ordered txn_id's first 10 hex digits): a few at the README's peak of 20 per
        second, up to ``hash-max-listpack-entries`` (512 at the site) still a compact listpack."""
        txn_id = str(txn_id)
        return f"{self.prefix}:done:{txn_id[:11]}", bytes.fromhex(txn_id[11:].replace("-", ""))

    def travel_key(self, txn_id) -> tuple[str, bytes]:
        """(bucket hash, field) of a status on its way (accepted, committed): as :meth:`final_key`, in the
        bucket ``on``, a field of ~80 bytes instead of a hash of its own (~240); see :func:`travelling_status`."""
        bucket, field = self.final_key(txn_id)
        return bucket.replace(":done:", ":on:", 1), field

    def row_key(self, table: str, key) -> str:
        return f"{self.prefix}:row:{table}:{key}"

    def rows_index(self, table: str) -> str:
        """All overlay rows of a table (an index's name, see :meth:`index_range`): UUIDv7 keys sort by time."""
        return f"rows:{table}"

    def partial_index(self, table: str) -> str:
        """Overlay rows that hold only some columns (updates of rows already in the replica)."""
        return f"partial:{table}"

    def field_index(self, table: str, field: str, value) -> str:
        return f"idx:{table}:{field}:{encode(value)}"

    def index_bucket(self, index: str, key: str) -> str | bytes:
        """The sorted set of ``index`` that holds ``key``: the keys sharing its first 10 bytes (~4 s of
        UUIDv7 time, ~80 keys at the README's peak), few enough to stay a listpack (~40 bytes a key, not
        a skiplist's ~130); the index's directory (:meth:`index_directory`) lists its buckets.

        Bytes, as the Lua scripts cut them: a natural key's first 10 bytes may end inside a character, so
        a key that is not ASCII (never a UUID) names its bucket in bytes. Buckets are key prefixes, so the
        directory lists them in key order and a page walks them in order; natural keys sharing a long prefix
        share a bucket (which then may outgrow a listpack: correct, larger)."""
        if key.isascii():
            return f"{self.prefix}:b:{key[:BUCKET_CHARS]}:{index}"
        return f"{self.prefix}:b:".encode() + key.encode()[:BUCKET_CHARS] + f":{index}".encode()

    def index_directory(self, index: str) -> str:
        return f"{self.prefix}:dir:{index}"

    def index_set(self, index: str) -> str:
        """An index of the layout before the buckets: one sorted set, only ever shrunk now."""
        return f"{self.prefix}:{index}"

    # Keys other parts of opsync keep in the site's Redis, named here so the prefix's layout is in one place.

    @property
    def alerts_sent(self) -> str:
        return f"{self.prefix}:alerts:sent"

    @property
    def alerts_findings(self) -> str:
        return f"{self.prefix}:alerts:findings"

    @property
    def capacity_readings(self) -> str:
        return f"{self.prefix}:capacity:readings"

    @property
    def capacity_bytes(self) -> str:
        return f"{self.prefix}:capacity:bytes"

    @property
    def drain_totals(self) -> str:
        return f"{self.prefix}:metrics:drain"

    @property
    def drain_latency(self) -> str:
        return f"{self.prefix}:metrics:drain:latency"

    @property
    def drain_errors(self) -> str:
        return f"{self.prefix}:metrics:drain:errors"

    @property
    def drain_minutes(self) -> str:
        """The prefix of the drain's per-minute counters (the minute follows)."""
        return f"{self.prefix}:metrics:drain:minute:"

    @property
    def publisher_figures(self) -> str:
        return f"{self.prefix}:publisher"

    @property
    def publisher_poison(self) -> str:
        return f"{self.prefix}:publisher:poison"


def events_channel(prefix: str) -> str:
    """The events channel of the site with ``prefix``, for a subscriber that holds no :class:`Keys`."""
    return f"{prefix}:events"
