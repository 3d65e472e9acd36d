-- RedisStore.delete (after store_unindex.lua): every key of the job, its idempotency
-- claim when it still points at the job, and its index entries.
-- KEYS: the job's keys, then the idempotency key (or ''); ARGV: prefix, id
local prefix, id = ARGV[1], ARGV[2]
local tenant = redis.call('HGET', KEYS[1], 'tenant')
  or redis.call('HGET', prefix .. ':index:owner', id)
local idem_key = KEYS[#KEYS]
if idem_key ~= '' and redis.call('GET', idem_key) == id then redis.call('DEL', idem_key) end
for i = 1, #KEYS - 1 do redis.call('DEL', KEYS[i]) end
unindex(prefix .. ':index:', id, tenant)
return 1
