-- SAQ's _retry transaction as one script, refused for a superseded delivery.
-- KEYS: active, queued, incomplete, job; ARGV: job, attempts, score, push now (1/0)
if not owned(KEYS[4], tonumber(ARGV[2])) then return 0 end
redis.call('LREM', KEYS[1], 1, KEYS[4])
redis.call('LREM', KEYS[2], 1, KEYS[4])
redis.call('ZADD', KEYS[3], ARGV[3], KEYS[4])
if ARGV[4] == '1' then redis.call('RPUSH', KEYS[2], KEYS[4]) end
redis.call('SET', KEYS[4], ARGV[1])
return 1
