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
