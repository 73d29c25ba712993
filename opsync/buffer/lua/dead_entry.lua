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
