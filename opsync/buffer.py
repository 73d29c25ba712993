"""The site buffer: a Redis stream of transactions plus their status, written atomically.

One Lua script writes the stream entry, the status record, the idempotency record, the overlay
of the rows it touches and the state-change event, so no half-written transaction can exist, and
a retried request with the same ``Idempotency-Key`` gets the original answer without writing
anything. The stream is the source of truth for the drainer; the pub/sub event is only a wake-up
and may be lost.

The overlay is what the merged view reads: per row, a hash ``row:<table>:<key>`` of the
buffered values (``v:<column>`` as JSON text, ``txn_id`` of the latest change, ``partial`` when
the rest of the row is in the replica, ``deleted``), plus sorted sets by key for listing
(``rows:<table>``), for partial rows (``partial:<table>``) and for each filterable column value
(``idx:<table>:<column>:<value>``), so no
query scans the buffer. The scripts touch keys they compute, so they need a single Redis (no
cluster), which a site has.
"""

import json
from dataclasses import dataclass

import redis

from opsync import registry
from opsync.envelope import State, Transaction

ENQUEUE = """
-- KEYS: stream, status, idempotency ('' when none)
-- ARGV: envelope, txn_id, accepted_at, body_hash, response, idempotency_ttl, events channel,
--       key prefix, then the overlay writes (see overlay_args)
-- Every check comes before the first write: Redis does not roll a script back.
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
local prefix, pos = ARGV[8], 9
while pos <= #ARGV do
  local tbl, key, op, nvalues = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local values = {unpack(ARGV, pos + 4, pos + 3 + 2 * nvalues)}
  pos = pos + 4 + 2 * nvalues
  local nindexed = tonumber(ARGV[pos])
  local indexed = {unpack(ARGV, pos + 1, pos + nindexed)}
  pos = pos + 1 + nindexed
  local row = prefix .. ':row:' .. tbl .. ':' .. key
  local existed = redis.call('EXISTS', row) == 1
  for _, field in ipairs(indexed) do
    local old = redis.call('HGET', row, 'v:' .. field)
    if old then redis.call('ZREM', prefix .. ':idx:' .. tbl .. ':' .. field .. ':' .. old, key) end
  end
  local partial = redis.call('HGET', row, 'partial') or '1'
  if op == 'insert' then
    redis.call('DEL', row)
    partial = '0'
  end
  if #values > 0 then redis.call('HSET', row, unpack(values)) end
  redis.call('HSET', row, 'txn_id', ARGV[2], 'partial', partial)
  if op == 'delete' then
    redis.call('HSET', row, 'deleted', '1')
    redis.call('ZREM', prefix .. ':rows:' .. tbl, key, prefix .. ':partial:' .. tbl, key)
  else
    redis.call('HDEL', row, 'deleted')
    redis.call('ZADD', prefix .. ':rows:' .. tbl, 0, key)
    if partial == '1' then
      redis.call('ZADD', prefix .. ':partial:' .. tbl, 0, key)
    else
      redis.call('ZREM', prefix .. ':partial:' .. tbl, key)
    end
    for _, field in ipairs(indexed) do
      local value = redis.call('HGET', row, 'v:' .. field)
      if value then redis.call('ZADD', prefix .. ':idx:' .. tbl .. ':' .. field .. ':' .. value, 0, key) end
    end
  end
end
redis.call('PUBLISH', ARGV[7], cjson.encode({txn_id = ARGV[2], state = 'accepted', at = ARGV[3]}))
return {'created', ARGV[5]}
"""

RELEASE = """
-- Drop overlay rows whose latest change is the given transaction (now in the replica).
-- ARGV: key prefix, txn_id, then per row: table, key, n indexed fields, fields...
local prefix, txn, pos = ARGV[1], ARGV[2], 3
local released = 0
while pos <= #ARGV do
  local tbl, key, nindexed = ARGV[pos], ARGV[pos + 1], tonumber(ARGV[pos + 2])
  local row = prefix .. ':row:' .. tbl .. ':' .. key
  if redis.call('HGET', row, 'txn_id') == txn then
    for i = pos + 3, pos + 2 + nindexed do
      local value = redis.call('HGET', row, 'v:' .. ARGV[i])
      if value then redis.call('ZREM', prefix .. ':idx:' .. tbl .. ':' .. ARGV[i] .. ':' .. value, key) end
    end
    redis.call('ZREM', prefix .. ':rows:' .. tbl, key)
    redis.call('ZREM', prefix .. ':partial:' .. tbl, key)
    redis.call('DEL', row)
    released = released + 1
  end
  pos = pos + 3 + nindexed
end
return released
"""


def overlay_args(txn: Transaction) -> list[str]:
    """The overlay writes of ``txn`` as flat script arguments: values stay the exact JSON text.

    Each value is JSON-encoded here, not re-encoded by Lua's cjson (which rounds numbers to 14
    digits), so the merged view shows exactly what was accepted.
    """
    args: list[str] = []
    for step in txn.steps:
        values = [item for field, value in step.values.items() for item in (f"v:{field}", encode(value))]
        indexed = registry.get_table(step.table).filterable
        args += [step.table, str(step.key), step.op, str(len(values) // 2), *values, str(len(indexed)), *indexed]
    return args


def encode(value) -> str:
    """The one JSON encoding of overlay values and of the filter values compared with them."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

FINAL_STATES = frozenset({State.replicated, State.failed})


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used with a different request body."""


@dataclass(frozen=True)
class Enqueued:
    replayed: bool  # True: an earlier identical request already buffered it; nothing written now
    response: dict


class Buffer:
    """The durable queue at the site; keys live under one prefix so several sites can share a test Redis."""

    def __init__(
        self, client: redis.Redis, prefix: str = "opsync", idempotency_ttl_s: int = 7 * 86400, status_ttl_s: int = 7 * 86400
    ):
        self.client = client
        self.prefix = prefix
        self.idempotency_ttl_s = idempotency_ttl_s
        self.status_ttl_s = status_ttl_s
        self._enqueue = client.register_script(ENQUEUE)
        self._release = client.register_script(RELEASE)

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
                json.dumps(response), self.idempotency_ttl_s, self.events, self.prefix, *overlay_args(txn),
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
        return self.statuses([txn_id])[0]

    def statuses(self, txn_ids: list) -> list[dict[str, str] | None]:
        """Status records in one round trip; None where unknown (or expired after the retention)."""
        pipe = self.client.pipeline(transaction=False)
        for txn_id in txn_ids:
            pipe.hgetall(self.status_key(txn_id))
        return [{k.decode(): v.decode() for k, v in raw.items()} or None for raw in pipe.execute()]

    def record_state(self, txn_id, state: str, at: str, **fields: str) -> None:
        """Record a state transition and announce it, in one MULTI.

        A status is kept as long as its transaction is on its way, however long the link is down;
        once final (``replicated`` or ``failed``) it lives ``status_ttl_s`` more, then expires.
        """
        key = self.status_key(txn_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": state, f"{state}_at": at, **fields})
        if state in FINAL_STATES:
            pipe.expire(key, self.status_ttl_s)
        pipe.publish(self.events, json.dumps({"txn_id": str(txn_id), "state": state, "at": at, **fields}))
        pipe.execute()

    def release_rows(self, txn: Transaction) -> int:
        """Once ``txn`` is in the replica, its rows are read from there: drop their overlay.

        Only rows whose latest buffered change is ``txn`` go; a row changed again by a later
        transaction keeps its overlay until that one is replicated too.
        """
        args: list[str] = []
        for step in txn.steps:
            indexed = registry.get_table(step.table).filterable
            args += [step.table, str(step.key), str(len(indexed)), *indexed]
        return self._release(args=[self.prefix, str(txn.txn_id), *args])

    def row_key(self, table: str, key) -> str:
        return f"{self.prefix}:row:{table}:{key}"

    def rows_index(self, table: str) -> str:
        """All overlay rows of a table, score 0, so members sort by key: UUIDv7 keys sort by time."""
        return f"{self.prefix}:rows:{table}"

    def partial_index(self, table: str) -> str:
        """Overlay rows that hold only some columns (updates of rows already in the replica)."""
        return f"{self.prefix}:partial:{table}"

    def field_index(self, table: str, field: str, value) -> str:
        return f"{self.prefix}:idx:{table}:{field}:{encode(value)}"

    def depth(self) -> int:
        return self.client.xlen(self.stream)

