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
      for _, row in ipairs(envelope_rows(entry[2][i + 1])) do
        steps = steps + 1
        local fields = indexed[row[1]] or {}
        rows[#rows + 1] = row[1]
        rows[#rows + 1] = row[2]
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
