-- The envelope codec's Lua half (opsync/buffer/codec.py writes the format): the (table, key) of each step of
-- a buffered envelope, in step order. The compact format is an array [1, txn_id, site, accepted_at,
-- idempotency_key, steps], each step [op, table, key, values]; the one before it an object with named fields.
local function envelope_rows(raw)
  local txn, rows = cjson.decode(raw), {}
  if string.sub(raw, 1, 1) == '[' then
    for _, step in ipairs(txn[6]) do rows[#rows + 1] = {step[2], step[3]} end
  else
    for _, step in ipairs(txn.steps) do rows[#rows + 1] = {step.table, step.key} end
  end
  return rows
end
