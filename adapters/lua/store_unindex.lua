-- Removes a job id from every listing and count index (delete, and pruning of expired
-- jobs). Loaded in front of store_delete.lua and store_prune.lua; __STATUSES__ is
-- replaced by the job statuses as a Lua list when the scripts are loaded.
local function unindex(idx, id, tenant)
  redis.call('ZREM', idx .. 'all', id)
  redis.call('HDEL', idx .. 'owner', id)
  for _, s in ipairs(__STATUSES__) do
    redis.call('ZREM', idx .. 'status:' .. s, id)
    if tenant then redis.call('ZREM', idx .. 'tstatus:' .. s .. ':' .. tenant, id) end
  end
  if tenant then redis.call('ZREM', idx .. 'tenant:' .. tenant, id) end
end
