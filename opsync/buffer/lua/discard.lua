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
