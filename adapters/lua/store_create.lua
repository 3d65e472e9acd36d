-- RedisStore.create: a job, its idempotency claim, its first events and its index
-- entries (each event also PUBLISHed, as in store_append_event.lua), atomically.
-- Returns the earlier job's id when the claim is held, else false.
-- KEYS: job, idempotency key (or ''), event counter, event stream
-- ARGV: prefix, id, tenant, status, created, ttl, idem_ttl, n_events,
--       (type, data)..., then the job's (field, value) pairs
local job_key, idem_key, seq_key, ev_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, id, tenant, status, created = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, idem_ttl, n_events = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local fields_at = 9 + 2 * n_events
if idem_key ~= '' then
  local existing = redis.call('GET', idem_key)
  if existing and redis.call('EXISTS', prefix .. ':job:' .. existing) == 1 then
    return existing
  end
  redis.call('SET', idem_key, id, 'EX', idem_ttl)
end
if redis.call('EXISTS', job_key) == 1 then
  return redis.error_reply('job ' .. id .. ' exists')
end
redis.call('HSET', job_key, unpack(ARGV, fields_at))
redis.call('EXPIRE', job_key, ttl)
for j = 9, fields_at - 1, 2 do
  local n = redis.call('INCR', seq_key)
  redis.call('XADD', ev_key, n .. '-0', 'type', ARGV[j], 'data', ARGV[j + 1])
  redis.call('PUBLISH', ev_key, n .. ' ' .. ARGV[j] .. ' ' .. ARGV[j + 1])
end
if n_events > 0 then
  redis.call('EXPIRE', seq_key, ttl)
  redis.call('EXPIRE', ev_key, ttl)
end
local idx = prefix .. ':index:'
redis.call('ZADD', idx .. 'all', created, id)
redis.call('ZADD', idx .. 'status:' .. status, created, id)
redis.call('ZADD', idx .. 'tenant:' .. tenant, created, id)
redis.call('ZADD', idx .. 'tstatus:' .. status .. ':' .. tenant, created, id)
redis.call('HSET', idx .. 'owner', id, tenant)
return false
