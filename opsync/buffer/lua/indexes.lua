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
