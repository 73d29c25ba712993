"""The site buffer: a Redis stream of transactions plus their status, written atomically.

One Lua script writes the stream entry, the status record, the idempotency record and the
state-change event, so no half-written transaction can exist, and a retried request with the same
``Idempotency-Key`` gets the original answer without writing anything. The stream is the source of
truth for the drainer; the pub/sub event is only a wake-up and may be lost.
"""

import json
from dataclasses import dataclass

import redis

from opsync.envelope import Transaction

ENQUEUE = """
-- KEYS: stream, status, idempotency ('' when none)
-- ARGV: envelope, txn_id, accepted_at, body_hash, response, idempotency_ttl, events channel
if KEYS[3] ~= '' then
  local previous = redis.call('HMGET', KEYS[3], 'body_hash', 'response')
  if previous[1] then
    if previous[1] == ARGV[4] then return {'replayed', previous[2]} end
    return {'conflict', previous[2]}
  end
end
local entry = redis.call('XADD', KEYS[1], '*', 'txn', ARGV[1])
redis.call('HSET', KEYS[2], 'state', 'accepted', 'accepted_at', ARGV[3], 'stream_id', entry)
if KEYS[3] ~= '' then
  redis.call('HSET', KEYS[3], 'body_hash', ARGV[4], 'response', ARGV[5], 'txn_id', ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
redis.call('PUBLISH', ARGV[7], cjson.encode({txn_id = ARGV[2], state = 'accepted', at = ARGV[3]}))
return {'created', ARGV[5]}
"""


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used with a different request body."""


@dataclass(frozen=True)
class Enqueued:
    replayed: bool  # True: an earlier identical request already buffered it; nothing written now
    response: dict


class Buffer:
    """The durable queue at the site; keys live under one prefix so several sites can share a test Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "opsync", idempotency_ttl_s: int = 7 * 86400):
        self.client = client
        self.prefix = prefix
        self.idempotency_ttl_s = idempotency_ttl_s
        self._enqueue = client.register_script(ENQUEUE)

    @property
    def stream(self) -> str:
        return f"{self.prefix}:buffer"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def dead_letters(self) -> str:
        """Stream of transactions that failed permanently, with the database's reason."""
        return f"{self.prefix}:dead"

    @property
    def awaiting_replica(self) -> str:
        """Sorted set of committed transactions by commit LSN (as a number), until the replica passes them."""
        return f"{self.prefix}:awaiting"

    @property
    def group(self) -> str:
        """The stream's one consumer group: the drainers."""
        return "drain"

    def status_key(self, txn_id) -> str:
        return f"{self.prefix}:txn:{txn_id}"

    def idempotency_key(self, client_id: str, key: str) -> str:
        return f"{self.prefix}:idem:{client_id}:{key}"

    def enqueue(
        self, txn: Transaction, response: dict, idempotency: tuple[str, str] | None = None, body_hash: str = ""
    ) -> Enqueued:
        """Buffer ``txn`` durably and return ``response`` (or the original one for a replay).

        ``idempotency`` is ``(client_id, key)``: keys are per client, so two scripts cannot
        collide by choosing the same key.
        """
        idem_key = self.idempotency_key(*idempotency) if idempotency else ""
        outcome, stored = self._enqueue(
            keys=[self.stream, self.status_key(txn.txn_id), idem_key],
            args=[
                txn.model_dump_json(), str(txn.txn_id), txn.accepted_at.isoformat(), body_hash,
                json.dumps(response), self.idempotency_ttl_s, self.events,
            ],
        )
        if outcome == b"conflict":
            raise IdempotencyConflict(idempotency[1])
        return Enqueued(replayed=outcome == b"replayed", response=json.loads(stored))

    def replay(self, idempotency: tuple[str, str], body_hash: str) -> dict | None:
        """The stored answer to an earlier identical request, None if there was none."""
        body, response = self.client.hmget(self.idempotency_key(*idempotency), "body_hash", "response")
        if body is None:
            return None
        if body.decode() != body_hash:
            raise IdempotencyConflict(idempotency[1])
        return json.loads(response)

    def remember(self, idempotency: tuple[str, str], body_hash: str, response: dict) -> None:
        key = self.idempotency_key(*idempotency)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"body_hash": body_hash, "response": json.dumps(response)})
        pipe.expire(key, self.idempotency_ttl_s)
        pipe.execute()

    def status(self, txn_id) -> dict[str, str] | None:
        raw = self.client.hgetall(self.status_key(txn_id))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    def record_state(self, txn_id, state: str, at: str, **fields: str) -> None:
        """Record a state transition and announce it, in one MULTI."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.status_key(txn_id), mapping={"state": state, f"{state}_at": at, **fields})
        pipe.publish(self.events, json.dumps({"txn_id": str(txn_id), "state": state, "at": at, **fields}))
        pipe.execute()

    def depth(self) -> int:
        return self.client.xlen(self.stream)

