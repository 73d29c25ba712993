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
  for row in string.gmatch(ARGV[10], '[^%z]+') do in_replica[row] = true end  -- NUL-separated: no key holds one
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
