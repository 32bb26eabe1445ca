-- Use an invitation once for a new volunteer name: check and count in one step, so two joins
-- racing for the last use, or for one name, cannot both win.
-- KEYS: the invitation hash, the identities hash, the volunteers set
-- ARGV: name, now, the identity record (JSON) to keep under the name
-- Returns {outcome, uses left}: 'ok' | 'unknown' | 'expired' | 'used-up' | 'taken'
local f = redis.call('HMGET', KEYS[1], 'uses', 'expires')
if not f[1] then return {'unknown', 0} end
if tonumber(f[2]) <= tonumber(ARGV[2]) then return {'expired', 0} end
if tonumber(f[1]) <= 0 then return {'used-up', 0} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  return {'taken', tonumber(f[1])}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {'ok', redis.call('HINCRBY', KEYS[1], 'uses', -1)}
