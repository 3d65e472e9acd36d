-- Fair scheduling across tenants on SAQ's Redis queue (adapters/saq_fair.py), loaded
-- in front of the scripts that route a job through it. Keys, under a prefix P:
--   P..'q:'..tenant  a tenant's queued job ids, oldest first
--   P..'ring'        tenants with queued jobs, in turn order (a tenant is listed iff its
--                    queue is not empty)
--   P..'running'     hash tenant -> jobs of the tenant in SAQ's active list
--   P..'tenant'      hash job id -> tenant, from enqueue to finish
--   P..'counted'     hash job id -> tenant, for each job a pick counted in 'running'
--   P..'parked'      wake-up tokens taken while every queued job's tenant was at its cap
-- SAQ's own queued list holds one wake-up token per queued job: a worker slot blocks on
-- it (BLMOVE, as upstream) and then picks a job with saq_fair_pick.lua.
local function fair_push(prefix, tenant, job, at_head)
  local q = prefix .. 'q:' .. tenant
  local n
  if at_head then n = redis.call('LPUSH', q, job) else n = redis.call('RPUSH', q, job) end
  if n == 1 then redis.call('RPUSH', prefix .. 'ring', tenant) end
end

local function fair_unqueue(prefix, tenant, job)
  -- takes job out of its tenant's queue if it is there
  local q = prefix .. 'q:' .. tenant
  if redis.call('LREM', q, 1, job) > 0 and redis.call('LLEN', q) == 0 then
    redis.call('LREM', prefix .. 'ring', 1, tenant)
  end
end

local function fair_left(prefix, job, queued)
  -- job left SAQ's active list: uncount it, and wake a slot for a job held at a cap
  local tenant = redis.call('HGET', prefix .. 'counted', job)
  if not tenant then return end
  redis.call('HDEL', prefix .. 'counted', job)
  if redis.call('HINCRBY', prefix .. 'running', tenant, -1) <= 0 then
    redis.call('HDEL', prefix .. 'running', tenant)
  end
  redis.call('LMOVE', prefix .. 'parked', queued, 'LEFT', 'RIGHT')
end
