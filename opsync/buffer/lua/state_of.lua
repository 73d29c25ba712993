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
