-- Jobs waiting to be picked: every tenant's queue, plus job ids in SAQ's queued list
-- (the upstream layout) but not its wake-up tokens.
-- KEYS: queued; ARGV: fair prefix, token
local n = redis.call('LLEN', KEYS[1]) - #redis.call('LPOS', KEYS[1], ARGV[2], 'COUNT', 0)
for _, tenant in ipairs(redis.call('LRANGE', ARGV[1] .. 'ring', 0, -1)) do
  n = n + redis.call('LLEN', ARGV[1] .. 'q:' .. tenant)
end
return n
