-- SAQ's _retry transaction as one script, refused for a superseded delivery. A job
-- enqueued for a tenant goes back to its tenant's queue (saq_fair.lua) with a wake-up
-- token; one without to SAQ's queued list, as upstream.
-- KEYS: active, queued, incomplete, job
-- ARGV: job, attempts, score, push now (1/0), fair prefix, token
if not owned(KEYS[4], tonumber(ARGV[2])) then return 0 end
local left = redis.call('LREM', KEYS[1], 1, KEYS[4])
local tenant = redis.call('HGET', ARGV[5] .. 'tenant', KEYS[4]) or ''
if tenant == '' then
  redis.call('LREM', KEYS[2], 1, KEYS[4])
else
  fair_unqueue(ARGV[5], tenant, KEYS[4])
end
redis.call('ZADD', KEYS[3], ARGV[3], KEYS[4])
if ARGV[4] == '1' then
  if tenant == '' then
    redis.call('RPUSH', KEYS[2], KEYS[4])
  else
    fair_push(ARGV[5], tenant, KEYS[4], false)
    redis.call('RPUSH', KEYS[2], ARGV[6])
  end
end
redis.call('SET', KEYS[4], ARGV[1])
if left > 0 then fair_left(ARGV[5], KEYS[4], KEYS[2]) end
return 1
