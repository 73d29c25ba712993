"""The drainer's side: claim entries in stream order, settle a batch after the primary's commit
(``settle.lua``), confirm what the replica has replayed (``confirm.lua``), and an operator's requeue or
discard of a dead letter (``requeue.lua``, ``discard.lua``).

SETTLE acknowledges a batch only after the primary's commit and records each outcome (committed and
awaiting the replica, or failed and moved to the dead-letter stream); CONFIRM marks a transaction
replicated and releases its overlay in one step (a few dozen per call), leaving a compact status in a
bucket hash for the retention (see :meth:`Keys.final_key`). REQUEUE and DISCARD are single scripts, so a
second or concurrent call finds the entry gone and changes nothing.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis

from opsync import registry
from opsync.buffer.codec import Envelope
from opsync.buffer.keys import Keys
from opsync.lsn import Lsn


def release_args(txn: Envelope) -> list[str]:
    """The overlay rows ``txn`` wrote, as flat script arguments for ``release_rows``."""
    args: list[str] = []
    for step in txn.steps:
        indexed = registry.get_table(step.table).filterable
        args += [step.table, str(step.key), str(len(indexed)), *indexed]
    return args


@cache
def indexed_args() -> tuple[str, ...]:
    """Each ingestible table's filterable columns, as flat script arguments: what CONFIRM unindexes."""
    args: list[str] = []
    for entry in registry.ingestible_tables():
        args += [entry.name, str(len(entry.filterable)), *entry.filterable]
    return tuple(args)


@dataclass(frozen=True)
class Entry:
    """A claimed stream entry; ``envelope`` is None when the entry was deleted meanwhile."""

    stream_id: str
    envelope: bytes | None


@dataclass(frozen=True)
class Settlement:
    """Where a drained entry went: ``committed``, ``duplicate`` (in the ledger already), ``failed`` or ``gone``."""

    outcome: str
    stream_id: str
    txn_id: str = ""  # empty for an entry whose envelope could not be read
    reason: str = ""
    rows: tuple[str, ...] = ()  # a failed transaction's rows ('table:key'), so dependants can name it


DEAD_PAGE = 1000  # dead letters read per round trip
CLAIM_PAGE = 50  # entries per stream read: a reply of 50 bodies of the largest size takes Redis ~20 ms
# A drain's calls are sized to hold Redis ~1-2 ms each (every POST waits behind the one running): 250 transactions
# confirmed or settled per call made the ingest p99 while draining ~10x its idle one (``make bench-outage``).
CONFIRM_TRANSACTIONS = 25  # per CONFIRM call: ~50 µs each (release, status, event); one call per transaction was CPU-bound
CONFIRM_STEPS = 50  # a CONFIRM call stops past this many released steps (+1 per transaction)
SETTLE_ENTRIES = 100  # entries per SETTLE call: ~15 µs each (ack, status, event)
SETTLE_ROWS = 1000  # failed entries' rows per call, one dead-rows HSET each
SETTLE_FAILED = 2  # failed entries per call: each copies its envelope (up to the body limit) into the dead letters


def settle_chunks(settlements: list[Settlement]) -> Iterator[list[Settlement]]:
    """``settlements`` in order, in chunks one SETTLE call does within 50 ms at the API's largest input
    (``make bench-scripts``); an entry bigger than a chunk's share is a chunk of its own."""
    chunk: list[Settlement] = []
    rows = failed = 0
    for s in settlements:
        is_failed = s.outcome == "failed"
        if chunk and (len(chunk) == SETTLE_ENTRIES or rows + len(s.rows) > SETTLE_ROWS or failed + is_failed > SETTLE_FAILED):
            yield chunk
            chunk, rows, failed = [], 0, 0
        chunk.append(s)
        rows, failed = rows + len(s.rows), failed + is_failed
    if chunk:
        yield chunk


class Drains(Keys):
    """:class:`~opsync.buffer.Buffer`'s drainer side."""

    client: redis.Redis
    status_ttl_s: int
    _settle: "redis.commands.core.Script"
    _confirm: "redis.commands.core.Script"
    _requeue: "redis.commands.core.Script"
    _discard: "redis.commands.core.Script"

    def note(self, activity: str, at: str) -> None:
        """Record that ``activity`` ("drain", "confirm") just succeeded: operators watch how long ago that was."""
        self.client.hset(self.activity, f"{activity}_at", at)

    def ensure_group(self) -> None:
        """Create the drainers' group (and the stream) once; from the start, so nothing buffered is skipped."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim(self, consumer: str, count: int, after: str = "0") -> list[Entry]:
        """Up to ``count`` entries in stream order: ``consumer``'s unacknowledged ones first (a run that
        died left them), then new ones. Nothing leaves the stream here: only :meth:`settle` acknowledges.
        ``after`` (a stream ID) skips the pending ones up to it: a batch claimed but not yet settled.
        """
        entries = self._read(consumer, after, count)
        if len(entries) < count:
            entries += self._read(consumer, ">", count - len(entries))
        return entries

    def _read(self, consumer: str, start: str, count: int) -> list[Entry]:
        """Up to ``count`` entries from ``start`` ('0': this consumer's pending ones, '>': new ones), read
        :data:`CLAIM_PAGE` at a time so no one reply holds Redis long."""
        entries: list[Entry] = []
        while len(entries) < count:
            want = min(CLAIM_PAGE, count - len(entries))
            reply = self.client.xreadgroup(self.group, consumer, {self.stream: start}, count=want)
            page = [Entry(sid.decode(), (fields or {}).get(b"txn")) for _, messages in reply for sid, fields in messages]  # type: ignore[union-attr, str-unpack]  # bytes
            entries += page
            if len(page) < want:
                break
            start = start if start == ">" else page[-1].stream_id  # pending ones after the last read
        return entries

    def reclaim(self, consumer: str, min_idle_ms: int, count: int = CLAIM_PAGE) -> int:
        """Move entries other consumers claimed and left idle that long (a crashed drainer's) to ``consumer``."""
        moved, start = 0, "0-0"
        while True:
            start, entries, _deleted = self.client.xautoclaim(self.stream, self.group, consumer, min_idle_ms, start, count=count)
            moved += len(entries)
            if start in (b"0-0", "0-0"):
                return moved

    def dead_owners(self, rows: list[str]) -> dict[str, str]:
        """Which of ``rows`` ('table:key') a dead-lettered transaction would have created, and which one."""
        if not rows:
            return {}
        owners = self.client.hmget(self.dead_rows, rows)
        return {row: owner.decode() for row, owner in zip(rows, owners, strict=True) if owner is not None}  # type: ignore[union-attr]  # bytes

    def settle(self, settlements: list[Settlement], commit_lsn: Lsn | None, at: str) -> None:
        """Acknowledge entries and record their states, only after the primary's commit, in bounded atomic steps.

        Committed ones wait in :attr:`awaiting_replica` scored by their LSN; failed ones move to the
        dead-letter stream with the reason. Each step settles a chunk (:func:`settle_chunks`), so no
        call holds Redis long; a crash before or between them redelivers the entries not settled
        yet, which the ledger then skips (and a failed one fails again, for the same reason).
        """
        head: list[Any] = [self.group, self.prefix, self.events, at, self.status_ttl_s, str(commit_lsn or ""), float(commit_lsn or 0)]
        for chunk in settle_chunks(settlements):
            args = list(head)
            for s in chunk:
                args += [s.outcome, s.stream_id, s.txn_id, s.reason, len(s.rows), *s.rows]
            self._settle(keys=[self.stream, self.awaiting_replica, self.dead_letters, self.dead_rows, self.unsent], args=args)

    def awaiting(self, upto: Lsn, count: int) -> list[str]:
        """The txn_ids committed at or before ``upto`` (by score; callers check the exact LSN)."""
        return [m.decode() for m in self.client.zrangebyscore(self.awaiting_replica, "-inf", float(upto), start=0, num=count)]  # type: ignore[union-attr]  # bytes

    def awaiting_count(self) -> int:
        """How many committed transactions await the replica."""
        return self.client.zcard(self.awaiting_replica)

    def oldest_awaiting(self) -> str | None:
        """The txn_id of the lowest-LSN transaction awaiting the replica; None when none does."""
        oldest = self.client.zrange(self.awaiting_replica, 0, 0)
        return oldest[0].decode() if oldest else None  # type: ignore[union-attr]  # bytes: no decode_responses

    def mark_replicated(self, confirmed: list[tuple[str, str]], at: str) -> int:
        """Mark each (txn_id, stream_id) replicated, release the overlay rows of its entry and drop the entry.

        Atomic per transaction and idempotent: one already confirmed (by another run) is left alone.
        Returns how many changed state now.
        """
        head: list[Any] = [self.prefix, at, self.status_ttl_s, self.events, CONFIRM_STEPS, len(indexed_args()), *indexed_args()]
        changed, todo = 0, list(confirmed)
        while todo:  # one call at a time, not pipelined: Redis runs a pipeline's calls back to back, a pause for every POST
            chunk, todo = todo[:CONFIRM_TRANSACTIONS], todo[CONFIRM_TRANSACTIONS:]
            pairs = [item for pair in chunk for item in pair]
            count, done = self._confirm(keys=[self.awaiting_replica, self.stream], args=[*head, *pairs])
            changed += count
            todo = chunk[done:] + todo  # a call that reached its budget: the rest go again
        return changed

    def requeue_dead(self, entry_id: str, txn: Envelope, created: list[str], at: str, by: str) -> str | None:
        """Move the dead letter ``entry_id`` back into the stream in one atomic step; its new stream ID.

        Its status becomes ``accepted`` again (the failure kept as ``previous_reason``), the rows it
        creates (``created``, 'table:key') stop refusing dependants, and the move is audited. None when
        the entry is gone: requeued or discarded already, so a second or concurrent call enqueues nothing.
        """
        txn_id = str(txn.txn_id)
        new_id = self._requeue(
            keys=[self.dead_letters, self.stream, self.status_key(txn_id), self.dead_rows, self.dlq_audit, self.unsent],
            args=[entry_id, txn_id, at, by, self.events, txn.accepted_at.isoformat(), *created],
        )
        return new_id.decode() if new_id else None

    def discard_dead(self, entry_id: str, txn: Envelope | None, created: list[str], at: str, by: str) -> bool:
        """Drop the dead letter ``entry_id`` for good, atomically: its overlay rows go (the merged view no
        longer shows them), its status stays ``failed`` with ``discarded_at``/``discarded_by``, and it
        is audited. False when the entry is gone already. ``txn`` is None for an unreadable envelope.
        """
        txn_id = str(txn.txn_id) if txn else ""
        return bool(
            self._discard(
                keys=[self.dead_letters, self.status_key(txn_id) if txn else "", self.dead_rows, self.dlq_audit],
                args=[
                    self.prefix,
                    entry_id,
                    txn_id,
                    at,
                    by,
                    self.status_ttl_s,
                    self.events,
                    len(created),
                    *created,
                    *(release_args(txn) if txn else []),
                ],
            )
        )

    def dead_entries(self) -> Iterator[tuple[str, dict[str, str]]]:
        """Every dead letter as (entry ID, its fields as text), oldest first, :data:`DEAD_PAGE` a round trip."""
        start = "-"
        while page := self.client.xrange(self.dead_letters, min=start, count=DEAD_PAGE):
            for entry_id, fields in page:
                yield entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}  # type: ignore[union-attr]  # bytes
            start = "(" + page[-1][0].decode()  # type: ignore[union-attr]  # bytes: no decode_responses

    def dlq_history(self, count: int) -> list[dict[str, str]]:
        """The latest ``count`` requeues and discards of the audit stream, newest first."""
        entries = self.client.xrevrange(self.dlq_audit, count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]  # type: ignore[union-attr]  # bytes: no decode_responses

    def forget_consumer(self, consumer: str) -> None:
        """Drop ``consumer`` from the group once it holds no entry (deleting one that holds entries would lose them)."""
        if not self.client.xpending_range(self.stream, self.group, "-", "+", 1, consumername=consumer):
            self.client.xgroup_delconsumer(self.stream, self.group, consumer)

    def depth(self) -> int:
        return self.client.xlen(self.stream)
