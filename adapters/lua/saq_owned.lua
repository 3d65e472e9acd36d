-- A delivery's writes to its SAQ job are refused once a later delivery took the job
-- (attempts only grow, one per dequeue). Loaded in front of saq_update.lua,
-- saq_retry.lua and saq_finish.lua.
local function owned(key, attempts)
  -- false once a later delivery (a higher attempt count) wrote the SAQ job
  local stored = redis.call('GET', key)
  if not stored then return true end
  local ok, job = pcall(cjson.decode, stored)
  return not ok or (tonumber(job['attempts']) or 0) <= attempts
end
