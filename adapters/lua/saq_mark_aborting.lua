-- SAQ's abort for a swept job, which stays in the active list until the retry moves it
-- (SAQ's own abort takes it out of every list at once).
-- KEYS: queued, job, abort flag; ARGV: job, abort flag ttl, error
redis.call('LREM', KEYS[1], 0, KEYS[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SETEX', KEYS[3], ARGV[2], ARGV[3])
redis.call('PUBLISH', KEYS[2], 'aborting')
