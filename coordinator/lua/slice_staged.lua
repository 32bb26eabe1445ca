-- Record a merged slice of a merge plan as staged, once: whoever merged it, the bytes are the same.
-- KEYS: merge hash
-- ARGV: plan id, position, where it is staged (a blob key; '' when the planner keeps it in memory)
-- Returns 'staged' | 'repeat' (another staged it first) | 'gone' (the plan is no longer the round's)
if redis.call('HGET', KEYS[1], 'plan_id') ~= ARGV[1] then return 'gone' end
if redis.call('HSETNX', KEYS[1], 'staged:' .. ARGV[2], ARGV[3]) == 0 then return 'repeat' end
return 'staged'
