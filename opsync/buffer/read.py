"""The read side: the overlay of buffered rows for the merged view (:mod:`opsync.merged`) and the read
model's publisher, without a scan.

The overlay is, per row, a hash ``row:<table>:<key>`` of the buffered values (``v:<column>`` as JSON
text, ``txn_id`` of the latest change, ``partial`` when the rest of the row is in the replica,
``creates`` when an upsert makes it stand without the replica, ``deleted``), plus indexes by key for
listing (``rows:<table>``), for partial rows (``partial:<table>``) and for each filterable column
value (``idx:<table>:<column>:<value>``), each a set of small sorted sets (see :meth:`Keys.index_bucket`).
"""

import json
from dataclasses import dataclass
from typing import Any

import redis

from opsync.buffer.keys import BUCKET_CHARS, Keys


@dataclass(frozen=True)
class BufferedRow:
    """A row's overlay hash, read back: the buffered values and how they stand."""

    values: dict[str, Any]
    txn_id: str  # of the latest change
    partial: bool  # the rest of the row is in the replica
    deleted: bool
    creates: bool  # an upsert: the row stands without the replica's

    @classmethod
    def parse(cls, raw: dict[bytes, bytes]) -> "BufferedRow":
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        values = {k[2:]: json.loads(v) for k, v in fields.items() if k.startswith("v:")}
        flags = [fields.get(flag) == "1" for flag in ("partial", "deleted", "creates")]
        return cls(values, fields["txn_id"], *flags)


class Reads(Keys):
    """:class:`~opsync.buffer.Buffer`'s read side."""

    client: redis.Redis
    _index_range: "redis.commands.core.Script"
    _overlay_exists: "redis.commands.core.Script"

    def overlay_rows(self, table: str, keys: list[str]) -> dict[str, BufferedRow]:
        """The overlay rows of ``keys`` that have one: one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.row_key(table, key))
        return {key: BufferedRow.parse(raw) for key, raw in zip(keys, pipe.execute(), strict=True) if raw}

    def overlaid(self, table: str, keys: list[str]) -> list[str]:
        """The ``keys`` that have an overlay hash (buffered deletes included, which the key index leaves out):
        one command (``overlay_exists.lua``), instead of one HGETALL per key."""
        if not keys:
            return []
        found = self._overlay_exists(args=[self.row_key(table, ""), "\0".join(keys)])
        return [keys[i - 1] for i in found]

    def entries_after(self, position: str | None, count: int, dead: bool = False) -> list[tuple[str, bytes | None]]:
        """Up to ``count`` entries of the stream (or of the dead letters) past ``position`` (a stream ID; None:
        from the first), as (stream ID, envelope; None for an entry without one)."""
        start = f"({position}" if position else "-"
        entries = self.client.xrange(self.dead_letters if dead else self.stream, min=start, max="+", count=count)
        return [(sid.decode(), fields.get(b"txn")) for sid, fields in entries]  # type: ignore[union-attr, misc]  # bytes: no decode_responses

    def unread_age(self, position: str | None) -> float:
        """Age of the first stream entry past ``position`` (every entry when None) by Redis' clock; 0 when there is none."""
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.xrange(self.stream, min=f"({position}" if position else "-", max="+", count=1)
        (seconds, micros), first = pipe.execute()
        if not first:
            return 0.0
        return max(0.0, seconds + micros / 1e6 - int(first[0][0].split(b"-")[0]) / 1000)

    def subscribe(self) -> "redis.client.PubSub":
        """A subscription to the buffer's events (wake-ups only: one may be lost)."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.events)
        return pubsub

    def index_range(self, index: str, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` keys of ``index`` past ``after``, in key order, in one round trip (:data:`INDEX_RANGE`)."""
        start = f"({after}" if after else "-"
        found = self._index_range(args=[self.prefix, index, start, limit, BUCKET_CHARS])
        return sorted({k.decode() for k in found})[:limit]

    def index_contains(self, index: str, keys: list[str]) -> list[bool]:
        """Whether each of ``keys`` is in ``index``: one ZMSCORE per bucket (and one in the earlier layout's set)."""
        by_bucket: dict[str | bytes, list[str]] = {}
        for key in keys:
            by_bucket.setdefault(self.index_bucket(index, key), []).append(key)
        pipe = self.client.pipeline(transaction=False)
        pipe.zmscore(self.index_set(index), keys)
        for bucket, members in by_bucket.items():
            pipe.zmscore(bucket, members)
        old, *scores = pipe.execute()
        found = {
            k
            for members, got in zip(by_bucket.values(), scores, strict=True)
            for k, score in zip(members, got, strict=True)
            if score is not None
        }
        return [key in found or score is not None for key, score in zip(keys, old, strict=True)]

    def index_buckets(self, index: str) -> int:
        """How many buckets ``index`` has (a size to compare indexes by), the earlier layout's set as one more per 80 keys."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.index_directory(index))
        pipe.zcard(self.index_set(index))
        buckets, old = pipe.execute()
        return buckets + -(-old // 80)
