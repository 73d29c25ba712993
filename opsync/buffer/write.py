"""The write side: enqueue a transaction with its status, idempotency record and overlay in one script
(``enqueue.lua``), and the statuses readers ask for.

ENQUEUE refuses, atomically with the write, an update or delete of a row a buffered transaction deleted
or that neither the overlay nor the replica has (:mod:`opsync.existence` asks the replica). A retried
request with the same ``Idempotency-Key`` gets the original answer without writing anything.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
import redis.asyncio as aioredis

from opsync import registry
from opsync.buffer.codec import encode as encode_envelope
from opsync.buffer.keys import Keys
from opsync.buffer.records import (
    OWN_KEY_RECORD_BYTES,
    digest,
    encode,
    final_status,
    idempotency_field,
    pack_response,
    record,
    split_record,
    travelling_status,
    unpack_response,
)
from opsync.buffer.scripts import ENQUEUE
from opsync.envelope import Op, State, Transaction
from opsync.lsn import Lsn

if TYPE_CHECKING:
    from opsync.buffer import Buffer

CREATES = (Op.insert, Op.upsert)


def overlay_args(txn: Transaction) -> list[str]:
    """The overlay writes of ``txn`` as flat script arguments: values as the primary will store them, as exact JSON text.

    Each value is JSON-encoded here, not re-encoded by Lua's cjson (which rounds numbers to 14
    digits), so the merged view shows exactly what was accepted.
    """
    args: list[str] = []
    for step in txn.steps:
        values = [item for field, value in step.shown.items() for item in (f"v:{field}", encode(value))]
        indexed = registry.get_table(step.table).filterable
        args += [step.table, str(step.key), step.op, str(len(values) // 2), *values, str(len(indexed)), *indexed]
    return args


def tables_field(txn: Transaction) -> str:
    """The tables ``txn`` involves, as its status record and first event hold them: who may see it follows from them."""
    return ",".join(sorted({step.table for step in txn.steps}))


def involved_tables(field: str | bytes | None) -> frozenset[str]:
    """The tables of a status record's (or event's) ``tables`` field; none for a record written before it existed."""
    if isinstance(field, bytes):
        field = field.decode()
    return frozenset(field.split(",")) if field else frozenset()


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used with a different request body."""


class NoSuchRow(LookupError):
    """Step ``step`` updates or deletes a row that is not there: deleted by the still buffered transaction
    ``deleted_by`` (or by an earlier step of its own), or known neither to the buffer nor to the replica."""

    def __init__(self, txn: Transaction, step: int, deleted_by: str | None = None):
        target = txn.steps[step]
        if deleted_by == str(txn.txn_id):
            why = "deleted by an earlier step of this transaction"
        elif deleted_by:
            why = f"deleted by transaction {deleted_by}, still buffered"
        else:
            why = "neither the site buffer nor the local replica has it"
        super().__init__(f"steps.{step}: no {target.table} row {target.key} to {target.op}: {why}")
        self.step, self.deleted_by = step, deleted_by


class UnknownRows(LookupError):
    """The overlay does not know the rows of ``steps`` (indexes): the replica must say whether it has them."""

    def __init__(self, txn: Transaction, steps: list[int]):
        super().__init__(f"{len(steps)} steps need the replica")
        self.txn, self.steps = txn, steps

    def rows(self) -> list[tuple[str, str]]:
        return [(self.txn.steps[i].table, str(self.txn.steps[i].key)) for i in self.steps]


@dataclass(frozen=True)
class Enqueued:
    replayed: bool  # True: an earlier identical request already buffered it; nothing written now
    response: dict


def enqueued(result: list, txn: Transaction, idempotency: tuple[str, str] | None) -> Enqueued:
    """What the ENQUEUE script answered: the stored response, or why nothing was written."""
    outcome, *rest = result
    if outcome == b"conflict":
        raise IdempotencyConflict(idempotency[1])  # type: ignore[index]  # only a request with a key conflicts
    if outcome == b"deleted":
        raise NoSuchRow(txn, rest[0], rest[1].decode())
    if outcome == b"unknown":
        raise UnknownRows(txn, rest)
    return Enqueued(replayed=outcome == b"replayed", response=unpack_response(rest[0]))


def checked_rows(txn: Transaction, in_replica: Iterable[str] | None) -> str:
    """The ENQUEUE script's argument for its row check: the rows the replica has ('table:key', NUL-separated: a
    natural key may hold a comma, no key a NUL), or '*' when there is nothing to check (only inserts and upserts,
    or ``in_replica`` None: the caller vouches)."""
    if in_replica is None or all(step.op in CREATES for step in txn.steps):
        return "*"
    return "\0".join(in_replica)


@asynccontextmanager
async def answered_within(seconds: float) -> AsyncIterator[None]:
    """Bound an asyncio client's commands as a whole; a RedisError (answered 503) when Redis is too slow.

    Instead of redis-py's ``socket_timeout``, which wraps every write in ``asyncio.wait_for``: one
    more task and event-loop turn per command. A command cut short disconnects its connection, so
    no later command can read its answer.
    """
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise redis.TimeoutError(f"no answer from the site buffer within {seconds} s") from None


class AsyncEnqueuer:
    """:meth:`Buffer.enqueue` on an asyncio Redis client, for the ingest API's event loop.

    The same script, keys and arguments; awaiting it instead of handing the call to a worker
    thread saves the API about a fifth of its CPU per write (``make bench-ingest``). The client
    should have no ``socket_timeout``: each enqueue is bounded by ``timeout_s`` as a whole.
    """

    def __init__(self, buffer: "Buffer", client: aioredis.Redis, timeout_s: float = 5):
        self.buffer = buffer
        self.client = client
        self.timeout_s = timeout_s
        self._enqueue = client.register_script(ENQUEUE)

    async def prepare(self) -> None:
        """Connect and load the script now, so the first enqueue does not wait for either."""
        async with answered_within(self.timeout_s):
            await self.client.script_load(ENQUEUE)

    async def enqueue(
        self,
        txn: Transaction,
        response: dict,
        idempotency: tuple[str, str] | None = None,
        body_hash: str = "",
        in_replica: Iterable[str] | None = None,
    ) -> Enqueued:
        call = self.buffer.enqueue_call(txn, response, idempotency, body_hash, in_replica)
        async with answered_within(self.timeout_s):
            result = await self._enqueue(**call)
        return enqueued(result, txn, idempotency)


async def tables_of(client: aioredis.Redis, keys: Keys, txn_id: str) -> frozenset[str]:
    """The tables transaction ``txn_id`` involves, from its status record, on an asyncio client (the events
    stream's): on its way, replicated, or a hash of its own; none when it has no status."""
    status = travelling_status(await client.hget(*keys.travel_key(txn_id)))  # type: ignore[arg-type]  # bytes
    status = status or final_status(await client.hget(*keys.final_key(txn_id)))  # type: ignore[arg-type]  # bytes
    return involved_tables(status.get("tables") if status else await client.hget(keys.status_key(txn_id), "tables"))


class Writes(Keys):
    """:class:`~opsync.buffer.Buffer`'s write side."""

    client: redis.Redis
    status_ttl_s: int
    _enqueue: "redis.commands.core.Script"

    def enqueue(
        self,
        txn: Transaction,
        response: dict,
        idempotency: tuple[str, str] | None = None,
        body_hash: str = "",
        in_replica: Iterable[str] | None = None,
    ) -> Enqueued:
        """Buffer ``txn`` durably and return ``response`` (or the original one for a replay).

        ``idempotency`` is ``(client_id, key)``: keys are per client, so two scripts cannot
        collide by choosing the same key. With ``in_replica`` (the rows, 'table:key', the caller
        found in the replica), an update or delete of a row that is not there is refused
        (:class:`NoSuchRow`, :class:`UnknownRows`); None buffers what it is given (tests of the
        drain's failure paths, which buffer what an older site version might have).
        """
        call = self.enqueue_call(txn, response, idempotency, body_hash, in_replica)
        return enqueued(self._enqueue(**call), txn, idempotency)

    def enqueue_call(
        self,
        txn: Transaction,
        response: dict,
        idempotency: tuple[str, str] | None,
        body_hash: str,
        in_replica: Iterable[str] | None = None,
    ) -> dict:
        """The keys and arguments of the ENQUEUE script for ``txn``, whichever client runs it."""
        idem_key, idem_arg, buckets = "", str(self.idempotency_ttl_s), list[str]()
        if idempotency:
            idem_key, hashed, packed = self.idempotency_key(*idempotency), digest(body_hash), pack_response(response)
            if len(record(hashed, packed)) + len(idempotency_field(*idempotency)) <= OWN_KEY_RECORD_BYTES:
                buckets, expire_at = self.idempotency_buckets(idempotency)
                idem_arg += f" {expire_at} {idempotency_field(*idempotency)}"
        return {
            "keys": [self.stream, self.status_key(txn.txn_id), idem_key, self.unsent, *buckets],
            "args": [
                encode_envelope(txn),
                str(txn.txn_id),
                txn.accepted_at.isoformat(),
                digest(body_hash),
                pack_response(response),
                idem_arg,
                self.events,
                self.prefix,
                tables_field(txn),
                checked_rows(txn, in_replica),
                *overlay_args(txn),
            ],
        }

    def replay(self, idempotency: tuple[str, str], body_hash: str) -> dict | None:
        """The stored answer to an earlier identical request, None if there was none."""
        key = self.idempotency_key(*idempotency)
        pipe = self.client.pipeline(transaction=False)
        pipe.type(key)
        pipe.get(key)
        for bucket in self.idempotency_buckets(idempotency)[0]:
            pipe.hget(bucket, idempotency_field(*idempotency))
        kind, value, *found = pipe.execute(raise_on_error=False)
        if kind == b"hash":  # a record of the layout before the compact one
            old, response = self.client.hmget(key, "body_hash", "response")
            body = digest(old.decode())  # type: ignore[union-attr]  # bytes: no decode_responses
        else:
            value = value if isinstance(value, bytes) else next((v for v in found if v is not None), None)
            if value is None:
                return None
            body, response = split_record(value)
        if body != digest(body_hash):
            raise IdempotencyConflict(idempotency[1])
        return unpack_response(response)  # type: ignore[arg-type]  # the old layout's record has both fields

    def remember(self, idempotency: tuple[str, str], body_hash: str, response: dict) -> None:
        value, field = record(digest(body_hash), pack_response(response)), idempotency_field(*idempotency)
        if len(value) + len(field) > OWN_KEY_RECORD_BYTES:
            self.client.set(self.idempotency_key(*idempotency), value, ex=self.idempotency_ttl_s)
            return
        buckets, expire_at = self.idempotency_buckets(idempotency)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(buckets[0], field, value)
        pipe.pexpireat(buckets[0], expire_at, nx=True)
        pipe.execute()

    def status(self, txn_id) -> dict[str, str] | None:
        return self.statuses([txn_id])[0]

    def statuses(self, txn_ids: list) -> list[dict[str, str] | None]:
        """Status records, in one round trip while they travel (two for replicated ones, in their buckets);
        None where unknown (or expired after the retention)."""
        pipe = self.client.pipeline(transaction=False)
        for txn_id in txn_ids:
            pipe.hget(*self.travel_key(txn_id))
            pipe.hget(*self.final_key(txn_id))
        replies = pipe.execute()
        found = [travelling_status(on) or final_status(done) for on, done in zip(replies[::2], replies[1::2], strict=True)]
        missing = [i for i, status in enumerate(found) if status is None]
        if missing:  # failed, requeued, written straight to the primary, or of the earlier layout: a hash of its own
            for i in missing:
                pipe.hgetall(self.status_key(txn_ids[i]))
            for i, raw in zip(missing, pipe.execute(), strict=True):
                found[i] = {k.decode(): v.decode() for k, v in raw.items()} or None
        return found

    def mark_committed(self, txn_id, commit_lsn: Lsn, at: str, **fields: str) -> None:
        """A transaction written straight to the primary: committed, and awaiting the replica like drained ones.

        Not final yet, so its status has no TTL: CONFIRM sets one once it is replicated.
        """
        fields = {"commit_lsn": str(commit_lsn), **fields}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.status_key(txn_id), mapping={"state": State.committed, "committed_at": at, **fields})  # type: ignore[dict-item]  # invariant key
        pipe.zadd(self.awaiting_replica, {str(txn_id): float(commit_lsn)})
        pipe.publish(self.events, json.dumps({"txn_id": str(txn_id), "state": State.committed, "at": at, **fields}))
        pipe.execute()
