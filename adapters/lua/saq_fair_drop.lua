-- The sweep's removal of an active job whose record is gone (SAQ's "missing job").
-- KEYS: queued, active, incomplete, job; ARGV: prefix
redis.call('LREM', KEYS[2], 0, KEYS[4])
redis.call('ZREM', KEYS[3], KEYS[4])
fair_left(ARGV[1], KEYS[4], KEYS[1])
redis.call('HDEL', ARGV[1] .. 'tenant', KEYS[4])
