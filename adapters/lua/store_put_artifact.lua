-- KEYS: the job's artifact hash; ARGV: name, artifact JSON, ttl. Returns the artifact's
-- sequence number (artifacts list in the order they were written).
local seq = redis.call('HINCRBY', KEYS[1], '#seq', 1)
redis.call('HSET', KEYS[1], ARGV[1], seq .. ' ' .. ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return seq
