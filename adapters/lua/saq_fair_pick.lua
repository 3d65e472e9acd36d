-- A worker slot's pick: the next tenant in turn whose running jobs are under the cap
-- gives its oldest queued job, which moves to SAQ's active list (as upstream's BLMOVE
-- moves a job id) and is counted for the tenant. Returns {job id, tenant} or nil.
-- KEYS: queued, active; ARGV: prefix, woken (the element the slot's BLMOVE moved from
-- queued to active, '' when the slot did not block), cap (0: none), token
local queued, active = KEYS[1], KEYS[2]
local prefix, woken, cap, token = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if woken ~= '' then
  -- not a token: a job id SAQ's own layout queued (enqueued with fair scheduling off,
  -- or before it existed); BLMOVE already moved it to the active list, as upstream
  if woken ~= token then return {woken, ''} end
  redis.call('LREM', active, -1, token)
end
local ring = prefix .. 'ring'
local running = prefix .. 'running'
for _ = 1, redis.call('LLEN', ring) do
  local tenant = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  if cap == 0 or (tonumber(redis.call('HGET', running, tenant)) or 0) < cap then
    local q = prefix .. 'q:' .. tenant
    local job = redis.call('LPOP', q)
    if redis.call('LLEN', q) == 0 then redis.call('LREM', ring, -1, tenant) end
    if job then
      redis.call('RPUSH', active, job)
      redis.call('HINCRBY', running, tenant, 1)
      redis.call('HSET', prefix .. 'counted', job, tenant)
      -- the job's wake-up token (a slot that blocked consumed one already)
      if woken == '' then redis.call('LREM', queued, 1, token) end
      return {job, tenant}
    end
  end
end
if redis.call('LLEN', ring) == 0 then
  -- nothing queued: tokens left over (a pick that found its job taken) wake no one
  redis.call('LREM', queued, 0, token)
  redis.call('DEL', prefix .. 'parked')
elseif woken ~= '' then
  -- every queued job's tenant is at its cap: the token waits for one of them to finish
  redis.call('RPUSH', prefix .. 'parked', token)
end
return false
