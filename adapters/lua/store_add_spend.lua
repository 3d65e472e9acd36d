-- KEYS: the spend counter; ARGV: amount (integer micro-USD, negative gives back), cap
-- ('' for none), ttl. A positive amount that would take the total past the cap is
-- refused. Returns the new total, or nil when refused (the counter unchanged).
local amount = tonumber(ARGV[1])
if ARGV[2] ~= '' and amount > 0 then
  local current = tonumber(redis.call('GET', KEYS[1]) or '0')
  if current + amount > tonumber(ARGV[2]) then
    return false
  end
end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return total
