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
