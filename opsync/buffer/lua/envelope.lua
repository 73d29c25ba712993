-- The envelope codec's Lua half (opsync/buffer/codec.py writes the format): the (table, key) of each step of
-- a buffered envelope, in step order.
local function envelope_rows(raw)
  local rows = {}
  for _, step in ipairs(cjson.decode(raw).steps) do rows[#rows + 1] = {step.table, step.key} end
  return rows
end
