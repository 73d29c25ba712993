-- Which of the keys have an overlay hash (buffered deletes included, which the key index leaves out).
-- ARGV: the overlay hashes' key prefix, then the keys NUL-separated (one argument, not 10,000 to encode; a natural
-- key may hold a comma, no key a NUL)
local found, i = {}, 0
for key in string.gmatch(ARGV[2], '[^%z]+') do
  i = i + 1
  if redis.call('EXISTS', ARGV[1] .. key) == 1 then found[#found + 1] = i end
end
return found
