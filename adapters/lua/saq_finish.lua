-- SAQ's _finish transaction (MULTI/EXEC) as one script, so it can share a batch,
-- refused for a superseded delivery.
-- KEYS: active, incomplete, job; ARGV: ttl, job, attempts
if not owned(KEYS[3], tonumber(ARGV[3])) then return 0 end
redis.call('LREM', KEYS[1], 1, KEYS[3])
redis.call('ZREM', KEYS[2], KEYS[3])
local ttl = tonumber(ARGV[1])
if ttl > 0 then
    redis.call('SETEX', KEYS[3], ttl, ARGV[2])
elseif ttl == 0 then
    redis.call('SET', KEYS[3], ARGV[2])
else
    redis.call('DEL', KEYS[3])
end
return 1
