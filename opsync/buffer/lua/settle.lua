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
