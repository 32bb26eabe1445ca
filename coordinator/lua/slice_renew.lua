-- Extend our lease on a slice of a merge plan while we merge it.
-- KEYS: merge hash
-- ARGV: plan id, position, owner, new lease end
-- Returns 'renewed' | 'lost' (the plan is gone, the slice is staged, or another took it over)
local position = ARGV[2]
if redis.call('HGET', KEYS[1], 'plan_id') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'owner:' .. position) ~= ARGV[3]
   or redis.call('HEXISTS', KEYS[1], 'staged:' .. position) == 1 then return 'lost' end
redis.call('HSET', KEYS[1], 'until:' .. position, ARGV[4])
return 'renewed'
