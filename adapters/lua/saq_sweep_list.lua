-- SAQ's own sweep listing: every job in the active list with its record, once per lock
-- period; nil while another sweep holds the lock.
-- KEYS: sweep lock, active list; ARGV: lock seconds
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('SETEX', KEYS[1], ARGV[1], 1)
local id_jobs = {}
for i, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    id_jobs[i] = {v, redis.call('GET', v)}
end
return id_jobs
