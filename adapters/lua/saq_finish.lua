-- SAQ's _finish transaction (MULTI/EXEC) as one script, so it can share a batch,
-- refused for a superseded delivery. The job's tenant is forgotten, and uncounted if it
-- was running (saq_fair.lua).
-- KEYS: active, incomplete, job, queued; ARGV: ttl, job, attempts, fair prefix
if not owned(KEYS[3], tonumber(ARGV[3])) then return 0 end
local left = redis.call('LREM', KEYS[1], 1, KEYS[3])
redis.call('ZREM', KEYS[2], KEYS[3])
local ttl = tonumber(ARGV[1])
if ttl > 0 then
    redis.call('SETEX', KEYS[3], ttl, ARGV[2])
elseif ttl == 0 then
    redis.call('SET', KEYS[3], ARGV[2])
else
    redis.call('DEL', KEYS[3])
end
redis.call('HDEL', ARGV[4] .. 'tenant', KEYS[3])
if left > 0 then fair_left(ARGV[4], KEYS[3], KEYS[4]) end
return 1
