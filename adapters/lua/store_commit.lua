-- RedisStore.commit: a step's artifacts, cache entries and trace records, then the
-- compare-and-set update of the job with its events (each also PUBLISHed on the
-- channel named after the event stream, adapters/redis_feed.py), in one round trip.
-- KEYS: the job's keys (see RedisKeys.job_keys), then one key per step cache entry.
-- ARGV: prefix, id, ttl, want_job, attempts (-1: any), n_expect (-1: any), expected...,
--       n_changes, (field, value)..., n_events, (type, data)..., n_artifacts,
--       (name, doc)..., n_cache, doc..., n_traces, record...
local job_key, art_key, ev_key, seq_key, trace_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, id, ttl, want_job = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local want_attempts = tonumber(ARGV[5])
if want_attempts >= 0 then
  -- a later delivery counted its attempt: this one writes nothing more
  local held = redis.call('HGET', job_key, 'attempts')
  if not held or tonumber(held) ~= want_attempts then return false end
end
local i = 6
local n_expect = tonumber(ARGV[i]); i = i + 1
local expected = {}
if n_expect > 0 then
  for j = i, i + n_expect - 1 do expected[ARGV[j]] = true end
  i = i + n_expect
end
local n_changes = tonumber(ARGV[i]); i = i + 1
local changes_at = i; i = i + 2 * n_changes
local n_events = tonumber(ARGV[i]); i = i + 1
local events_at = i; i = i + 2 * n_events
local n_artifacts = tonumber(ARGV[i]); i = i + 1
for j = i, i + 2 * n_artifacts - 1, 2 do
  local seq = redis.call('HINCRBY', art_key, '#seq', 1)
  redis.call('HSET', art_key, ARGV[j], seq .. ' ' .. ARGV[j + 1])
end
if n_artifacts > 0 then redis.call('EXPIRE', art_key, ttl) end
i = i + 2 * n_artifacts
local n_cache = tonumber(ARGV[i]); i = i + 1
for j = 1, n_cache do
  redis.call('SET', KEYS[6 + j], ARGV[i + j - 1], 'EX', ttl)
end
i = i + n_cache
local n_traces = tonumber(ARGV[i]); i = i + 1
if n_traces > 0 then
  redis.call('RPUSH', trace_key, unpack(ARGV, i, i + n_traces - 1))
  redis.call('EXPIRE', trace_key, ttl)
end
local current = redis.call('HGET', job_key, 'status')
if not current then return false end
if n_expect >= 0 and not expected[current] then return false end
local changes, new_status = {}, nil
for j = changes_at, changes_at + 2 * n_changes - 1, 2 do
  changes[#changes + 1] = ARGV[j]
  changes[#changes + 1] = ARGV[j + 1]
  if ARGV[j] == 'status' then new_status = ARGV[j + 1] end
end
if #changes > 0 then redis.call('HSET', job_key, unpack(changes)) end
if new_status and new_status ~= current then
  local tenant = redis.call('HGET', job_key, 'tenant')
  local created = redis.call('HGET', job_key, 'created_at')
  local idx = prefix .. ':index:'
  redis.call('ZREM', idx .. 'status:' .. current, id)
  redis.call('ZADD', idx .. 'status:' .. new_status, created, id)
  redis.call('ZREM', idx .. 'tstatus:' .. current .. ':' .. tenant, id)
  redis.call('ZADD', idx .. 'tstatus:' .. new_status .. ':' .. tenant, created, id)
end
for j = events_at, events_at + 2 * n_events - 1, 2 do
  local n = redis.call('INCR', seq_key)
  redis.call('XADD', ev_key, n .. '-0', 'type', ARGV[j], 'data', ARGV[j + 1])
  redis.call('PUBLISH', ev_key, n .. ' ' .. ARGV[j] .. ' ' .. ARGV[j + 1])
end
for j = 1, 6 do redis.call('EXPIRE', KEYS[j], ttl) end
if want_job == '1' then return redis.call('HGETALL', job_key) end
return 1
