-- An idempotency record: (body hash, response), nil when none. One string: byte 255, the 16-byte body
-- hash, the binary answer without its leading 255 (see pack_response); or a length byte, the body hash,
-- the response (text); or, written before those layouts, a hash of body_hash (hex) and response.
-- Small records are fields of bucket hashes (see Buffer.idempotency_buckets), larger ones a key each.
local function record_of(hash, response)
  if #hash == 16 and string.byte(response, 1) == 255 then return '\255' .. hash .. string.sub(response, 2) end
  return string.char(#hash) .. hash .. response
end
local function unpacked(value)
  local n = string.byte(value, 1)
  if n == 255 then return string.sub(value, 2, 17), '\255' .. string.sub(value, 18) end
  return string.sub(value, 2, n + 1), string.sub(value, n + 2)
end
local function remembered(key)
  if redis.call('TYPE', key).ok == 'hash' then
    local old = redis.call('HMGET', key, 'body_hash', 'response')
    local hex = old[1] or ''
    if #hex == 64 and string.match(hex, '^%x+$') then  -- as Python's digest(): the first 16 bytes
      hex = string.gsub(string.sub(hex, 1, 32), '..', function(cc) return string.char(tonumber(cc, 16)) end)
    end
    return hex, old[2]
  end
  local value = redis.call('GET', key)
  if not value then return nil end
  return unpacked(value)
end
-- The record in its own key or in one of the buckets (keys first to last, newest window first).
local function remembered_in(key, buckets, field)
  local body, response = remembered(key)
  if body then return body, response end
  for _, bucket in ipairs(buckets) do
    local value = redis.call('HGET', bucket, field)
    if value then return unpacked(value) end
  end
  return nil
end
