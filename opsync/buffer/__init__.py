"""The site buffer: a Redis stream of transactions plus their status, written atomically.

One Lua script writes the stream entry, the status record, the idempotency record, the overlay
of the rows it touches and the state-change event, so no half-written transaction can exist, and
a retried request with the same ``Idempotency-Key`` gets the original answer without writing
anything. The stream is the source of truth for the drainer; the pub/sub event is only a wake-up
and may be lost.

The overlay is what the merged view reads: per row, a hash ``row:<table>:<key>`` of the
buffered values (``v:<column>`` as JSON text, ``txn_id`` of the latest change, ``partial`` when
the rest of the row is in the replica, ``creates`` when an upsert makes it stand without the replica,
``deleted``), plus sorted sets by key for listing
(``rows:<table>``), for partial rows (``partial:<table>``) and for each filterable column value
(``idx:<table>:<column>:<value>``), so no
query scans the buffer. The scripts touch keys they compute, so they need a single Redis (no
cluster), which a site has. A change on top of a failed transaction's row starts the row afresh,
so no failed value shows under it; and ENQUEUE refuses, atomically with the write, an update or
delete of a row a buffered transaction deleted or that neither the overlay nor the replica has
(:mod:`opsync.existence` asks the replica).

The drainer's side is atomic the same way: SETTLE acknowledges a batch only after the primary's
commit and records each outcome (committed and awaiting the replica, or failed and moved to the
dead-letter stream); CONFIRM marks a transaction replicated and releases its overlay in one step
(a few dozen per call), leaving a compact status in a bucket hash for the retention (see
:meth:`Buffer.final_key`); idempotency records (:func:`pack_response`) are fields of bucket hashes by time
window (see :meth:`Buffer.idempotency_buckets`). Records of the earlier layouts (idempotency strings and
hashes of their own, replicated statuses kept whole) are still read.
An operator's REQUEUE (back into the stream) and DISCARD of a dead letter are single scripts too,
so a second or concurrent call finds the entry gone and changes nothing.
"""

import asyncio
import json
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic_core import to_json

from opsync import registry
from opsync.envelope import Op, State, Transaction
from opsync.lsn import Lsn

STATE_OF = """
-- Where a transaction's status lives: on its way (accepted, committed), one field of the bucket hash
-- 'on' of its 256 ms window of acceptance; once replicated, one field of the bucket 'done' of that
-- window (see Buffer.final_key); a hash of its own when failed, requeued or written straight to the
-- primary (reasons, who, when), and for statuses written before the 'on' buckets.
-- The field is the rest of the txn_id as bytes (11, not 25 characters of text).
local function slot_of(prefix, tag, txn)
  local rest = string.gsub(string.sub(txn, 12), '-', '')
  local bytes = string.gsub(rest, '..', function(cc) return string.char(tonumber(cc, 16)) end)
  return prefix .. ':' .. tag .. ':' .. string.sub(txn, 1, 11), bytes
end
local function final_of(prefix, txn)
  return slot_of(prefix, 'done', txn)
end
-- A status on its way, as the fields of its hash would be, and where it is (nil when not in a bucket).
-- Its value: 'a' or 'c' (accepted, committed), stream_id, accepted_at, tables[, committed_at, commit_lsn].
local function travelling(prefix, txn)
  local bucket, field = slot_of(prefix, 'on', txn)
  local value = redis.call('HGET', bucket, field)
  if not value then return nil end
  local p = {}
  for part in string.gmatch(value .. '|', '([^|]*)|') do p[#p + 1] = part end
  local status = {state = p[1] == 'c' and 'committed' or 'accepted', stream_id = p[2], accepted_at = p[3], tables = p[4]}
  if p[1] == 'c' then status.committed_at, status.commit_lsn = p[5], p[6] end
  return status, bucket, field
end
local function state_of(prefix, txn)
  local state = redis.call('HGET', prefix .. ':txn:' .. txn, 'state')
  if state then return state end
  local status = travelling(prefix, txn)
  if status then return status.state end
  local bucket, field = final_of(prefix, txn)
  if redis.call('HEXISTS', bucket, field) == 1 then return 'replicated' end
  return nil
end
"""

REMEMBERED = """
-- An idempotency record: (body hash, response), nil when none. One string: byte 255, the 16-byte body
-- hash, the binary answer without its leading 255 (see pack_response); or a length byte, the body hash,
-- the response (text); or, written before those layouts, a hash of body_hash (hex) and response.
-- Small records are fields of bucket hashes (see Buffer.idempotency_buckets), larger ones a key each.
local function record_of(hash, response)
  if #hash == 16 and string.byte(response, 1) == 255 then return '\\255' .. hash .. string.sub(response, 2) end
  return string.char(#hash) .. hash .. response
end
local function unpacked(value)
  local n = string.byte(value, 1)
  if n == 255 then return string.sub(value, 2, 17), '\\255' .. string.sub(value, 18) end
  return string.sub(value, 2, n + 1), string.sub(value, n + 2)
end
local function remembered(key)
  if redis.call('TYPE', key).ok == 'hash' then
    local old = redis.call('HMGET', key, 'body_hash', 'response')
    local hex = old[1] or ''
    if #hex == 64 and string.match(hex, '^%x+$') then  -- as Python's digest(): the first 16 bytes
      hex = string.gsub(string.sub(hex, 1, 32), '..', function(cc) return string.char(tonumber(cc, 16)) end)
    end
    return hex, old[2]
  end
  local value = redis.call('GET', key)
  if not value then return nil end
  return unpacked(value)
end
-- The record in its own key or in one of the buckets (keys first to last, newest window first).
local function remembered_in(key, buckets, field)
  local body, response = remembered(key)
  if body then return body, response end
  for _, bucket in ipairs(buckets) do
    local value = redis.call('HGET', bucket, field)
    if value then return unpacked(value) end
  end
  return nil
end
"""

INDEXES = """
-- An index of overlay rows (all rows of a table, its partial ones, or those with one value of a filterable
-- column) is a set of buckets: the keys of one ~4 s of UUIDv7 time (their first 10 characters) in a small
-- sorted set that stays a listpack, plus a directory of its buckets (see Buffer.index_range). An index of
-- the layout before the buckets (one sorted set, the base name itself) is only ever shrunk.
local function bucket_of(prefix, base, key)
  local bucket = string.sub(key, 1, 10)
  return prefix .. ':b:' .. bucket .. ':' .. base, prefix .. ':dir:' .. base, bucket
end
local function index_add(prefix, base, key)
  local set, dir, bucket = bucket_of(prefix, base, key)
  redis.call('ZADD', set, 0, key)
  redis.call('ZADD', dir, 0, bucket)
end
local function index_rem(prefix, base, key)
  local set, dir, bucket = bucket_of(prefix, base, key)
  if redis.call('ZREM', set, key) == 1 and redis.call('EXISTS', set) == 0 then redis.call('ZREM', dir, bucket) end
  redis.call('ZREM', prefix .. ':' .. base, key)
end
"""

ENQUEUE = (
    STATE_OF
    + REMEMBERED
    + INDEXES
    + """
-- KEYS: stream, status, idempotency ('' when none), unsent counter, then the idempotency buckets to read
--       (newest window first; the record is written to the first), none when the record takes a key of its own
-- ARGV: envelope, txn_id, accepted_at, body hash (the SHA-256 digest, 16 bytes), response,
--       idempotency: 'ttl' (its own key) or 'ttl expire_at_ms field' (the buckets), events channel,
--       key prefix, tables it involves (see tables_field), rows the caller found in the replica
--       ('table:key,...'; '*': nothing to check), then the overlay writes (see overlay_args)
-- Every check comes before the first write: Redis does not roll a script back.
local ttl, expire_at, field = string.match(ARGV[6], '^(%d+) ?(%d*) ?(.*)$')
local buckets = {unpack(KEYS, 5)}
if KEYS[3] ~= '' then
  local body, response = remembered_in(KEYS[3], buckets, field)
  if body then
    if body == ARGV[4] then return {'replayed', response} end
    return {'conflict', response}
  end
end
local prefix = ARGV[8]
-- A row's latest change counts only while its transaction may still reach the primary; a final
-- status outlives the overlay only for a failed one (a replicated one's overlay is released).
local function live(txn)
  local state = state_of(prefix, txn)
  return state and state ~= 'failed'
end
-- Updates and deletes need a row: one the overlay holds (not deleted) by a live transaction, one the
-- replica holds, or one an earlier step creates. 'deleted' names the deleting transaction; 'unknown'
-- lists the steps the replica must answer for (the caller asks it, then calls again).
if ARGV[10] ~= '*' then
  local in_replica, seen, unknown, pos, step = {}, {}, {}, 11, 0
  for row in string.gmatch(ARGV[10], '[^,]+') do in_replica[row] = true end
  while pos <= #ARGV do
    local name, op = ARGV[pos] .. ':' .. ARGV[pos + 1], ARGV[pos + 2]
    pos = pos + 4 + 2 * tonumber(ARGV[pos + 3])
    pos = pos + 1 + tonumber(ARGV[pos])
    if op == 'update' or op == 'delete' then
      local state = seen[name]
      if not state then
        local latest = redis.call('HMGET', prefix .. ':row:' .. name, 'txn_id', 'deleted')
        if latest[1] and live(latest[1]) then
          state = latest[2] == '1' and latest[1] or 'live'
        else
          state = in_replica[name] and 'live' or 'unknown'
        end
      end
      if state == 'unknown' then
        unknown[#unknown + 1] = step
      elseif state ~= 'live' then
        return {'deleted', step, state}
      end
      seen[name] = op == 'delete' and ARGV[2] or state
    else
      seen[name] = 'live'
    end
    step = step + 1
  end
  if #unknown > 0 then return {'unknown', unpack(unknown)} end
end
local entry = redis.call('XADD', KEYS[1], '*', 'txn', ARGV[1])
redis.call('INCR', KEYS[4])
local bucket, slot = slot_of(prefix, 'on', ARGV[2])
redis.call('HSET', bucket, slot, 'a|' .. entry .. '|' .. ARGV[3] .. '|' .. ARGV[9])
if KEYS[3] ~= '' then
  local record = record_of(ARGV[4], ARGV[5])
  if #buckets > 0 then
    redis.call('HSET', buckets[1], field, record)
    redis.call('PEXPIREAT', buckets[1], expire_at, 'NX')  -- the same for every record of the window
  else
    redis.call('SET', KEYS[3], record, 'EX', ttl)
  end
end
local pos = 11
-- Index members of new rows, added per bucket in a few ZADDs rather than one per row and index;
-- flushed before a row that exists already is merged (it may read or remove what is pending here).
local pending, order = {}, {}
local function add(set, member)
  local members = pending[set]
  if not members then
    members = {}
    pending[set] = members
    order[#order + 1] = set
  end
  members[#members + 1] = 0
  members[#members + 1] = member
end
local listed = {}  -- buckets pending for their directory already
local function later(base, key)
  local set, dir, bucket = bucket_of(prefix, base, key)
  add(set, key)
  if not listed[set] then
    listed[set] = true
    add(dir, bucket)
  end
end
local function flush()
  for _, set in ipairs(order) do
    local members = pending[set]
    for first = 1, #members, 2000 do
      redis.call('ZADD', set, unpack(members, first, math.min(first + 1999, #members)))
    end
  end
  pending, order, listed = {}, {}, {}
end
while pos <= #ARGV do
  local tbl, key, op, nvalues = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local values = {unpack(ARGV, pos + 4, pos + 3 + 2 * nvalues)}
  pos = pos + 4 + 2 * nvalues
  local nindexed = tonumber(ARGV[pos])
  local indexed = {unpack(ARGV, pos + 1, pos + nindexed)}
  pos = pos + 1 + nindexed
  local row = prefix .. ':row:' .. tbl .. ':' .. key
  if op ~= 'delete' and redis.call('EXISTS', row) == 0 then
    -- A row not buffered yet (nearly every insert): nothing to merge with or take out of an index.
    local partial = op == 'insert' and '0' or '1'
    redis.call('HSET', row, 'txn_id', ARGV[2], 'partial', partial, unpack(values))
    if op == 'upsert' then redis.call('HSET', row, 'creates', '1') end
    later('rows:' .. tbl, key)
    if partial == '1' then later('partial:' .. tbl, key) end
    local given = {}
    for i = 1, #values, 2 do given[values[i]] = values[i + 1] end
    for _, field in ipairs(indexed) do
      local value = given['v:' .. field]
      if value then later('idx:' .. tbl .. ':' .. field .. ':' .. value, key) end
    end
  else
    flush()
    for _, field in ipairs(indexed) do
      local old = redis.call('HGET', row, 'v:' .. field)
      if old then index_rem(prefix, 'idx:' .. tbl .. ':' .. field .. ':' .. old, key) end
    end
    local current = redis.call('HMGET', row, 'partial', 'txn_id', 'deleted')
    local partial, failed = current[1] or '1', current[2] and not live(current[2])
    local gone = current[3] == '1' and not failed
    if op == 'insert' or (op == 'upsert' and gone) then  -- a new row: nothing of the old one shows
      redis.call('DEL', row)
      partial = '0'
    elseif failed then  -- a failed transaction's values never show under a later one
      redis.call('DEL', row)
      partial = '1'
    end
    if #values > 0 then redis.call('HSET', row, unpack(values)) end
    redis.call('HSET', row, 'txn_id', ARGV[2], 'partial', partial)
    if op == 'upsert' then redis.call('HSET', row, 'creates', '1') end
    if op == 'delete' or (op == 'update' and gone) then  -- an update brings no deleted row back
      redis.call('HSET', row, 'deleted', '1')
      index_rem(prefix, 'rows:' .. tbl, key)
      index_rem(prefix, 'partial:' .. tbl, key)
    else
      redis.call('HDEL', row, 'deleted')
      index_add(prefix, 'rows:' .. tbl, key)
      if partial == '1' then
        index_add(prefix, 'partial:' .. tbl, key)
      else
        index_rem(prefix, 'partial:' .. tbl, key)
      end
      for _, field in ipairs(indexed) do
        local value = redis.call('HGET', row, 'v:' .. field)
        if value then index_add(prefix, 'idx:' .. tbl .. ':' .. field .. ':' .. value, key) end
      end
    end
  end
end
flush()
redis.call('PUBLISH', ARGV[7], cjson.encode({txn_id = ARGV[2], state = 'accepted', at = ARGV[3], tables = ARGV[9]}))
return {'created', ARGV[5]}
"""
)

RELEASE_ROWS = """
-- Drop overlay rows whose latest change is the given transaction (now in the replica).
-- args from pos on, per row: table, key, n indexed fields, fields...
local function release_rows(prefix, txn, args, pos)
  local released = 0
  while pos <= #args do
    local tbl, key, nindexed = args[pos], args[pos + 1], tonumber(args[pos + 2])
    local row = prefix .. ':row:' .. tbl .. ':' .. key
    if redis.call('HGET', row, 'txn_id') == txn then
      for i = pos + 3, pos + 2 + nindexed do
        local value = redis.call('HGET', row, 'v:' .. args[i])
        if value then index_rem(prefix, 'idx:' .. tbl .. ':' .. args[i] .. ':' .. value, key) end
      end
      index_rem(prefix, 'rows:' .. tbl, key)
      index_rem(prefix, 'partial:' .. tbl, key)
      redis.call('DEL', row)
      released = released + 1
    end
    pos = pos + 3 + nindexed
  end
  return released
end
"""

SETTLE = (
    STATE_OF
    + """
-- Acknowledge a drained batch and record where each transaction went, all at once.
-- KEYS: stream, awaiting replica, dead letters, dead rows, unsent counter
-- ARGV: group, key prefix, events channel, at, status ttl, commit lsn, lsn score, then per entry:
--       outcome (committed | duplicate | failed | gone: deleted meanwhile), stream_id, txn_id ('' if unreadable), reason,
--       n rows it creates, rows ('table:key')...
local group, prefix, channel, at, ttl, lsn, score = unpack(ARGV, 1, 7)
local function record(txn, state, field, value)  -- the status change and its event, as Buffer.mark_committed does it
  local key, status, bucket, slot = prefix .. ':txn:' .. txn, travelling(prefix, txn)
  if status and state == 'committed' then
    redis.call('HSET', bucket, slot, table.concat({'c', status.stream_id, status.accepted_at, status.tables, at, value}, '|'))
  else
    if status then  -- failed: into a hash of its own, with the reason
      redis.call('HDEL', bucket, slot)
      status.state = nil
      for name, kept in pairs(status) do redis.call('HSET', key, name, kept) end
    end
    redis.call('HSET', key, 'state', state, state .. '_at', at, field, value)
  end
  redis.call('PUBLISH', channel, cjson.encode({txn_id = txn, state = state, at = at, [field] = value}))
end
local function commit(txn)
  record(txn, 'committed', 'commit_lsn', lsn)
  redis.call('ZADD', KEYS[2], score, txn)
end
local pos = 8
while pos <= #ARGV do
  local outcome, id, txn, reason, nrows = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3], tonumber(ARGV[pos + 4])
  if redis.call('XACK', KEYS[1], group, id) == 1 then redis.call('DECR', KEYS[5]) end
  if outcome == 'committed' then
    commit(txn)
  elseif outcome == 'duplicate' then
    -- applied by a run that died before acknowledging: its LSN is lost, this batch's is past it
    local state = state_of(prefix, txn)
    if not state or state == 'accepted' then commit(txn) end
  elseif outcome == 'failed' then
    local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
    local envelope = ''
    if entry then
      for i = 1, #entry[2], 2 do if entry[2][i] == 'txn' then envelope = entry[2][i + 1] end end
    end
    redis.call('XADD', KEYS[3], '*', 'txn', envelope, 'txn_id', txn, 'reason', reason, 'stream_id', id, 'failed_at', at)
    redis.call('XDEL', KEYS[1], id)
    if txn ~= '' then
      record(txn, 'failed', 'reason', reason)
      redis.call('EXPIRE', prefix .. ':txn:' .. txn, ttl)
    end
    for i = pos + 5, pos + 4 + nrows do redis.call('HSET', KEYS[4], ARGV[i], txn) end
  end
  pos = pos + 5 + nrows
end
"""
)

CONFIRM = (
    STATE_OF
    + INDEXES
    + RELEASE_ROWS
    + """
-- Committed transactions are in the replica: mark each, release its overlay rows, forget its entry.
-- The rows are read from the entry's envelope here, so no envelope travels to the client and back.
-- A status of the usual fields moves into its bucket (see final_of): a few dozen bytes instead of a
-- hash of its own with its key and expiry, and without the stream_id of an entry that is gone.
-- KEYS: awaiting replica, stream
-- ARGV: key prefix, at, status ttl, events channel, budget (steps), n arguments of the indexed fields that
--       follow, per ingestible table: table, n indexed fields, fields..., then per transaction: txn_id,
--       stream_id ('' for direct writes)
local prefix, at, ttl, channel, budget = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local indexed, pos, last = {}, 7, 6 + tonumber(ARGV[6])
while pos <= last do
  local n = tonumber(ARGV[pos + 1])
  indexed[ARGV[pos]] = {unpack(ARGV, pos + 2, pos + 1 + n)}
  pos = pos + 2 + n
end
local COMPACT = {'accepted_at', 'committed_at', 'commit_lsn', 'tables'}
local KNOWN = {state = true, stream_id = true, accepted_at = true, committed_at = true, commit_lsn = true, tables = true}
local function release(txn, stream_id)
  local entry = stream_id ~= '' and redis.call('XRANGE', KEYS[2], stream_id, stream_id)[1]
  if not entry then return 0 end
  local rows, steps = {}, 0
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'txn' then
      for _, step in ipairs(cjson.decode(entry[2][i + 1]).steps) do
        steps = steps + 1
        local fields = indexed[step.table] or {}
        rows[#rows + 1] = step.table
        rows[#rows + 1] = step.key
        rows[#rows + 1] = #fields
        for _, field in ipairs(fields) do rows[#rows + 1] = field end
      end
    end
  end
  release_rows(prefix, txn, rows, 1)
  redis.call('XDEL', KEYS[2], stream_id)
  return steps
end
local function finish(txn)
  local key = prefix .. ':txn:' .. txn
  local flat, fields, compact = redis.call('HGETALL', key), {}, true
  for i = 1, #flat, 2 do
    fields[flat[i]] = flat[i + 1]
    if not KNOWN[flat[i]] or string.find(flat[i + 1], '|', 1, true) then compact = false end
  end
  if #flat == 0 then
    local status, bucket, slot = travelling(prefix, txn)
    if status then
      fields = status
      redis.call('HDEL', bucket, slot)
    end
  end
  if compact then
    local bucket, field = final_of(prefix, txn)
    local parts = {}
    for i, name in ipairs(COMPACT) do parts[i] = fields[name] or '' end
    parts[#parts + 1] = at
    for i in ipairs(parts) do parts[i] = string.gsub(parts[i], '^(%d%d%d%d%-.*)%+00:00$', '%1') end  -- UTC, put back on reading
    for _, i in ipairs({2, 5}) do  -- committed_at, replicated_at: as how many leading characters they share with accepted_at, and the rest
      local shared = 0
      while shared < #parts[1] and shared < #parts[i] and string.byte(parts[1], shared + 1) == string.byte(parts[i], shared + 1) do
        shared = shared + 1
      end
      if shared > 2 then parts[i] = shared .. '~' .. string.sub(parts[i], shared + 1) end
    end
    redis.call('HSET', bucket, field, table.concat(parts, '|'))
    redis.call('EXPIRE', bucket, ttl)  -- each confirmation extends it: every status in it is kept at least ttl
    redis.call('DEL', key)
  else  -- requeued ones (operator, reasons): rare, kept whole
    redis.call('HSET', key, 'state', 'replicated', 'replicated_at', at)
    redis.call('EXPIRE', key, ttl)
  end
end
-- Stops once it has done the budget's worth (steps released, one more per status), so a call stays
-- short; returns how many it confirmed and how many of the given ones it went through (the caller
-- sends the rest again).
local confirmed, work, i = 0, 0, last + 1
while i <= #ARGV and work < budget do
  local txn = ARGV[i]
  if redis.call('ZREM', KEYS[1], txn) == 1 then  -- else confirmed already
    work = work + release(txn, ARGV[i + 1])
    finish(txn)
    redis.call('PUBLISH', channel, cjson.encode({txn_id = txn, state = 'replicated', at = at}))
    confirmed = confirmed + 1
  end
  work = work + 1
  i = i + 2
end
return {confirmed, (i - last - 1) / 2}
"""
)

DEAD_ENTRY = """
-- The dead letter at id (fields as a table), or nil when it was requeued or discarded already.
local function dead_entry(stream, id)
  local entry = redis.call('XRANGE', stream, id, id)[1]
  if not entry then return nil end
  local fields = {}
  for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
  return fields
end
-- Rows from pos on ('table:key') stop refusing dependants, where txn is still their owner.
local function forget_dead_rows(hash, txn, args, pos, last)
  for i = pos, last do
    if redis.call('HGET', hash, args[i]) == txn then redis.call('HDEL', hash, args[i]) end
  end
end
"""

REQUEUE = (
    DEAD_ENTRY
    + """
-- Put a dead letter back into the buffer stream, fixed by an operator; the drain applies it (ledger-protected).
-- KEYS: dead letters, stream, status, dead rows, audit, unsent counter
-- ARGV: dead entry id, txn_id, at, by, events channel, accepted_at, then the rows it creates ('table:key')
local dead = dead_entry(KEYS[1], ARGV[1])
if not dead then return false end
if (dead.txn or '') == '' then return redis.error_reply('unreadable envelope: discard it instead') end
local txn, at, by = ARGV[2], ARGV[3], ARGV[4]
local id = redis.call('XADD', KEYS[2], '*', 'txn', dead.txn)
redis.call('INCR', KEYS[6])
redis.call('HDEL', KEYS[3], 'reason', 'failed_at')
redis.call('HSET', KEYS[3], 'state', 'accepted', 'stream_id', id, 'requeued_at', at, 'requeued_by', by,
           'previous_reason', dead.reason or '', 'previous_failed_at', dead.failed_at or '')
redis.call('HSETNX', KEYS[3], 'accepted_at', ARGV[6])
redis.call('PERSIST', KEYS[3])  -- on its way again: kept until final, like any accepted transaction
forget_dead_rows(KEYS[4], txn, ARGV, 7, #ARGV)
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'action', 'requeue', 'txn_id', txn, 'by', by, 'at', at, 'reason', dead.reason or '')
redis.call('PUBLISH', ARGV[5], cjson.encode({txn_id = txn, state = 'accepted', at = at, requeued_by = by}))
return id
"""
)

DISCARD = (
    DEAD_ENTRY
    + INDEXES
    + RELEASE_ROWS
    + """
-- Give a dead letter up: forget it, release its overlay rows, keep its status failed with who and when.
-- KEYS: dead letters, status ('' when the envelope was unreadable), dead rows, audit
-- ARGV: key prefix, dead entry id, txn_id, at, by, status ttl, events channel, n created rows, those rows,
--       then its overlay rows (see release_args)
local dead = dead_entry(KEYS[1], ARGV[2])
if not dead then return 0 end
local txn, at, by, ncreated = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[8])
redis.call('XDEL', KEYS[1], ARGV[2])
if txn ~= '' then
  redis.call('HSET', KEYS[2], 'state', 'failed', 'discarded_at', at, 'discarded_by', by)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  forget_dead_rows(KEYS[3], txn, ARGV, 9, 8 + ncreated)
  release_rows(ARGV[1], txn, ARGV, 9 + ncreated)
  redis.call('PUBLISH', ARGV[7], cjson.encode({txn_id = txn, state = 'failed', at = at, discarded_by = by}))
end
redis.call('XADD', KEYS[4], '*', 'action', 'discard', 'txn_id', txn, 'by', by, 'at', at, 'reason', dead.reason or '',
           'entry', ARGV[2])
return 1
"""
)


INDEX_RANGE = """
-- Up to limit keys of an index past start ('-' or '(key'), in no particular order: its buckets from the one
-- start is in, in order, until limit keys are found, and those of the earlier layout's single sorted set.
-- ARGV: key prefix, index, start, limit, bucket characters
local prefix, base, start, limit, chars = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local found = redis.call('ZRANGEBYLEX', prefix .. ':' .. base, start, '+', 'LIMIT', 0, limit)
local cursor, count = start == '-' and '-' or '[' .. string.sub(start, 2, 1 + chars), 0
while count < limit do
  local buckets = redis.call('ZRANGEBYLEX', prefix .. ':dir:' .. base, cursor, '+', 'LIMIT', 0, 16)
  for _, bucket in ipairs(buckets) do
    for _, key in ipairs(redis.call('ZRANGEBYLEX', prefix .. ':b:' .. bucket .. ':' .. base, start, '+', 'LIMIT', 0, limit - count)) do
      found[#found + 1] = key
      count = count + 1
    end
    if count >= limit then break end
  end
  if #buckets < 16 then break end
  cursor = '(' .. buckets[#buckets]
end
return found
"""

BUCKET_CHARS = 10  # of a UUID's text: 36 bits of its 48-bit millisecond time, ~4 s (see Buffer.index_bucket)

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


def release_args(txn: Transaction) -> list[str]:
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


def digest(body_hash: str) -> bytes:
    """A body hash as an idempotency record keeps it: a SHA-256 hex digest as its first 16 bytes (128 bits:
    only the client itself could look for a collision, at 2**64 tries), anything else as given."""
    if len(body_hash) == 64:
        try:
            return bytes.fromhex(body_hash)[:16]
        except ValueError:
            pass
    return body_hash.encode()


IDEMPOTENCY_WINDOWS = 8  # windows per TTL: a record lives at most an eighth of the TTL longer; a lookup reads 9 buckets
# Bucket hashes per window, by a hash of the key: at the README's peak (21 txns/s, a 7-day TTL: 1.6M records a
# window) ~190 records each, listpacks under hash-max-listpack-entries 512 up to 2.6 times that rate.
IDEMPOTENCY_BUCKETS = 8192
OWN_KEY_RECORD_BYTES = 200  # a larger record (field and value) keeps a key of its own: buckets stay listpacks


def idempotency_field(client_id: str, key: str) -> str:
    """A record's field in its bucket: the client and its key, apart (no header value holds a NUL)."""
    return f"{client_id}\0{key}"


def record(hashed: bytes, packed: bytes) -> bytes:
    """An idempotency record as the ENQUEUE script's ``record_of`` writes it."""
    if len(hashed) == 16 and packed.startswith(BINARY):
        return BINARY + hashed + packed[1:]
    return bytes([len(hashed)]) + hashed + packed


def split_record(value: bytes) -> tuple[bytes, bytes]:
    """(body hash, packed answer) of a record :func:`record` wrote."""
    if value.startswith(BINARY):
        return value[1:17], BINARY + value[17:]
    return value[1 : value[0] + 1], value[value[0] + 1 :]


def compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


ACCEPTED_ANSWER = ("txn_id", "ids", "state", "accepted_at")


BINARY = b"\xff"  # the first byte of a binary answer: no text answer (JSON, or a txn_id's hex digit) starts with it
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def pack_response(response: dict) -> bytes:
    """An answer as its idempotency record keeps it: the usual ``202`` (:func:`opsync.ingest.answer`) in
    binary (:func:`binary_answer`, 41 bytes for one row, a third of its text); else ``|``-separated values
    (state ``accepted`` as nothing, a UTC time without its ``+00:00``); any other answer as compact JSON."""
    if tuple(response) == ACCEPTED_ANSWER:
        if (packed := binary_answer(response)) is not None:
            return packed
        state = "" if response["state"] == State.accepted else response["state"]
        values = [response["txn_id"], state, utc_short(response["accepted_at"]), ",".join(response["ids"])]
        if all(isinstance(v, str) and "|" not in v for v in values) and all("," not in i for i in response["ids"]):
            return "|".join(values).encode()
    return compact_json(response).encode()


def binary_answer(response: dict) -> bytes | None:
    """An ``accepted`` answer as :data:`BINARY`, its txn_id's 16 bytes, its UTC ``accepted_at`` in µs since
    the epoch (8 bytes), each id's 16 bytes; None unless that gives back exactly the same text."""
    try:
        uuids = [uuid.UUID(response["txn_id"]), *map(uuid.UUID, response["ids"])]
        moment = datetime.fromisoformat(response["accepted_at"])
    except (TypeError, ValueError, AttributeError):
        return None
    if response["state"] != State.accepted or moment.utcoffset() != timedelta(0):
        return None
    micros = (moment - EPOCH) // timedelta(microseconds=1)
    packed = BINARY + uuids[0].bytes + micros.to_bytes(8, "big", signed=True) + b"".join(u.bytes for u in uuids[1:])
    return packed if unpack_response(packed) == response else None


def unpack_response(packed: bytes | str) -> dict:
    """The answer :func:`pack_response` packed (or JSON, as records of the earlier layout hold it)."""
    if isinstance(packed, bytes) and packed.startswith(BINARY):
        ids = [str(uuid.UUID(bytes=packed[i : i + 16])) for i in range(25, len(packed), 16)]
        moment = EPOCH + timedelta(microseconds=int.from_bytes(packed[17:25], "big", signed=True))
        return {
            "txn_id": str(uuid.UUID(bytes=packed[1:17])),
            "ids": ids,
            "state": State.accepted.value,
            "accepted_at": moment.isoformat(),
        }
    text = packed.decode() if isinstance(packed, bytes) else packed
    if text.startswith("{"):
        return json.loads(text)
    txn_id, state, accepted_at, joined = text.split("|")
    return {
        "txn_id": txn_id,
        "ids": joined.split(",") if joined else [],
        "state": state or State.accepted.value,
        "accepted_at": utc_long(accepted_at),
    }


def utc_short(moment: str) -> str:
    """An ISO time as the compact records keep it: a UTC one without its ``+00:00`` (:func:`utc_long` adds it)."""
    return moment.removesuffix("+00:00")


def utc_long(moment: str) -> str:
    has_offset = moment.endswith("Z") or (len(moment) > 6 and moment[-6] in "+-" and moment[-3] == ":")
    return moment if has_offset or not moment else moment + "+00:00"


FINAL_FIELDS = ("accepted_at", "committed_at", "commit_lsn", "tables", "replicated_at")


def final_status(value: bytes | None) -> dict[str, str] | None:
    """A replicated transaction's status from its bucket field (CONFIRM's compact form: timestamps in UTC
    without their ``+00:00``, which comes back here)."""
    if value is None:
        return None
    parts = value.decode().split("|")
    for i in (1, 4):  # committed_at, replicated_at: 'n~rest' shares its first n characters with accepted_at
        shared, sep, rest = parts[i].partition("~")
        if sep:
            parts[i] = parts[0][: int(shared)] + rest
    status = {name: v for name, v in zip(FINAL_FIELDS, parts, strict=True) if v}
    for name in ("accepted_at", "committed_at", "replicated_at"):
        if name in status:
            status[name] = utc_long(status[name])
    return {"state": State.replicated.value} | status


TRAVELLING_FIELDS = ("stream_id", "accepted_at", "tables", "committed_at", "commit_lsn")


def travelling_status(value: bytes | None) -> dict[str, str] | None:
    """A status on its way from its bucket field (ENQUEUE's and SETTLE's): ``a`` (accepted) or ``c`` (committed),
    then the stream_id, accepted_at and tables, and for a committed one committed_at and commit_lsn."""
    if value is None:
        return None
    state, *parts = value.decode().split("|")
    return {"state": (State.committed if state == "c" else State.accepted).value} | dict(zip(TRAVELLING_FIELDS, parts, strict=False))


def encode(value) -> str:
    """The one JSON encoding of overlay values and of the filter values compared with them.

    pydantic-core's encoder: five times faster than ``json.dumps`` on the batch path; NaN stays NaN.
    """
    return to_json(value, inf_nan_mode="constants").decode()


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
    """The ENQUEUE script's argument for its row check: the rows the replica has ('table:key'), or '*' when
    there is nothing to check (only inserts and upserts, or ``in_replica`` None: the caller vouches)."""
    if in_replica is None or all(step.op in CREATES for step in txn.steps):
        return "*"
    return ",".join(in_replica)


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


class Buffer:
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
    def activity(self) -> str:
        """Hash of when the drainer last finished a drain (``drain_at``) and a confirmation (``confirm_at``)."""
        return f"{self.prefix}:activity"

    def note(self, activity: str, at: str) -> None:
        """Record that ``activity`` ("drain", "confirm") just succeeded: operators watch how long ago that was."""
        self.client.hset(self.activity, f"{activity}_at", at)

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
        return "drain"

    def status_key(self, txn_id) -> str:
        return f"{self.prefix}:txn:{txn_id}"

    def idempotency_key(self, client_id: str, key: str) -> str:
        return f"{self.prefix}:idem:{client_id}:{key}"

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
                txn.model_dump_json(),
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

    def requeue_dead(self, entry_id: str, txn: Transaction, created: list[str], at: str, by: str) -> str | None:
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

    def discard_dead(self, entry_id: str, txn: Transaction | None, created: list[str], at: str, by: str) -> bool:
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

    def index_bucket(self, index: str, key: str) -> str:
        """The sorted set of ``index`` that holds ``key``: the keys sharing its first 10 characters (~4 s of
        UUIDv7 time, ~80 keys at the README's peak), few enough to stay a listpack (~40 bytes a key, not
        a skiplist's ~130); the index's directory (``<prefix>:dir:<index>``) lists its buckets."""
        return f"{self.prefix}:b:{key[:BUCKET_CHARS]}:{index}"

    def index_range(self, index: str, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` keys of ``index`` past ``after``, in key order, in one round trip (:data:`INDEX_RANGE`)."""
        start = f"({after}" if after else "-"
        found = self._index_range(args=[self.prefix, index, start, limit, BUCKET_CHARS])
        return sorted({k.decode() for k in found})[:limit]

    def index_contains(self, index: str, keys: list[str]) -> list[bool]:
        """Whether each of ``keys`` is in ``index``: one ZMSCORE per bucket (and one in the earlier layout's set)."""
        by_bucket: dict[str, list[str]] = {}
        for key in keys:
            by_bucket.setdefault(self.index_bucket(index, key), []).append(key)
        pipe = self.client.pipeline(transaction=False)
        pipe.zmscore(f"{self.prefix}:{index}", keys)
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
        pipe.zcard(f"{self.prefix}:dir:{index}")
        pipe.zcard(f"{self.prefix}:{index}")
        buckets, old = pipe.execute()
        return buckets + -(-old // 80)

    def depth(self) -> int:
        return self.client.xlen(self.stream)
