-- Take a slice of a sliced round's merge plan to merge: the first one neither staged nor held
-- under a live lease (a slice whose aggregator died is taken again once its lease ran out).
-- KEYS: merge hash (keys.merge_plan), round hash
-- ARGV: plan id, owner, now, lease seconds
-- Returns the slice's position in the plan (0 or more) |
--         -1 (every slice is staged) | -2 (none free: the rest are held) |
--         -3 (no such plan: the round was merged, failed, or planned again)
if redis.call('HGET', KEYS[1], 'plan_id') ~= ARGV[1]
   or redis.call('HGET', KEYS[2], 'status') ~= 'aggregating' then return -3 end
local count = tonumber(redis.call('HGET', KEYS[1], 'count'))
local now = tonumber(ARGV[3])
local held = false
for position = 0, count - 1 do
  if redis.call('HEXISTS', KEYS[1], 'staged:' .. position) == 0 then
    local until_ = tonumber(redis.call('HGET', KEYS[1], 'until:' .. position) or '0')
    if until_ <= now then
      redis.call('HSET', KEYS[1], 'owner:' .. position, ARGV[2],
                 'until:' .. position, tostring(now + tonumber(ARGV[4])))
      return position
    end
    held = true
  end
end
if held then return -2 end
return -1
