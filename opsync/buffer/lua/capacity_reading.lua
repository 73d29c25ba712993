-- One reading of the buffer's counters at one instant by Redis' clock (opsync.monitoring.capacity), kept in a window of them.
-- KEYS: stream, unsent, awaiting replica, drain totals, readings, kept measure
-- ARGV: window s, seconds between kept readings
local now = redis.call('TIME')
local at = tonumber(now[1]) + tonumber(now[2]) / 1e6
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
local accepted = 0
if not info.err then
  for i = 1, #info, 2 do if info[i] == 'entries-added' then accepted = info[i + 1] end end
end
local memory = redis.call('INFO', 'memory')
local used = tonumber(string.match(memory, '[\r\n]used_memory:(%d+)'))
local maxmemory = tonumber(string.match(memory, '[\r\n]maxmemory:(%d+)'))
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local reading = table.concat({string.format('%.6f', at), accepted, tonumber(redis.call('GET', KEYS[2]) or 0),
  redis.call('ZCARD', KEYS[3]), tonumber(redis.call('HGET', KEYS[4], 'transactions_applied') or 0), used, run_id}, ' ')
local window, every = tonumber(ARGV[1]), tonumber(ARGV[2])
while true do
  local first = redis.call('LINDEX', KEYS[5], 0)
  if not first or tonumber(string.match(first, '^(%S+)')) >= at - window then break end
  redis.call('LPOP', KEYS[5])
end
local last = redis.call('LINDEX', KEYS[5], -1)
if (maxmemory == 0 or used < maxmemory) and (not last or tonumber(string.match(last, '^(%S+)')) <= at - every) then
  redis.call('RPUSH', KEYS[5], reading)
  redis.call('EXPIRE', KEYS[5], math.ceil(window) + 60)
end
return {reading, redis.call('LRANGE', KEYS[5], 0, -1), maxmemory, redis.call('HGETALL', KEYS[6])}
