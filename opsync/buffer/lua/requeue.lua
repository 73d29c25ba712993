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
