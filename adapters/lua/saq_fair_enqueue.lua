-- SAQ's enqueue script, with the job queued for its tenant and a wake-up token in SAQ's
-- queued list instead of the job id.
-- KEYS: incomplete, job, queued, abort flag; ARGV: job, scheduled, prefix, tenant, token
if not redis.call('ZSCORE', KEYS[1], KEYS[2]) and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[1], ARGV[2], KEYS[2])
  redis.call('HSET', ARGV[3] .. 'tenant', KEYS[2], ARGV[4])
  if ARGV[2] == '0' then
    fair_push(ARGV[3], ARGV[4], KEYS[2], false)
    redis.call('RPUSH', KEYS[3], ARGV[5])
  end
  return 1
end
return false
