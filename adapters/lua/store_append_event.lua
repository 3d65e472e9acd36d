-- KEYS: event counter, event stream; ARGV: type, data JSON, ttl. Event n is stream
-- entry '<n>-0', also published as '<n> <type> <data>' on the channel named after the
-- stream (adapters/redis_feed.py); returns n.
local n = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], n .. '-0', 'type', ARGV[1], 'data', ARGV[2])
redis.call('PUBLISH', KEYS[2], n .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return n
