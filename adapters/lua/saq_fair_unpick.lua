-- A stopping worker's slot got a job it will not start: back to the head of its
-- tenant's queue, uncounted, with its wake-up token.
-- KEYS: queued, active, job; ARGV: prefix, tenant, token
if redis.call('LREM', KEYS[2], 1, KEYS[3]) == 0 then return 0 end
fair_left(ARGV[1], KEYS[3], KEYS[1])
fair_push(ARGV[1], ARGV[2], KEYS[3], true)
redis.call('LPUSH', KEYS[1], ARGV[3])
return 1
