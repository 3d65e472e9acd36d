-- Drops index entries older than the cutoff whose job expired (after store_unindex.lua).
-- ARGV: prefix, cutoff (created_at), batch size; returns how many were removed
local prefix, cutoff, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local idx = prefix .. ':index:'
local removed = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', idx .. 'all', '-inf', cutoff, 'LIMIT', 0, batch)) do
  if redis.call('EXISTS', prefix .. ':job:' .. id) == 0 then
    unindex(idx, id, redis.call('HGET', idx .. 'owner', id))
    removed = removed + 1
  end
end
return removed
