-- SAQ's _update (a SET of the job record), refused for a superseded delivery.
-- KEYS: job; ARGV: job, attempts
if not owned(KEYS[1], tonumber(ARGV[2])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
