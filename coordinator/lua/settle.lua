-- Change one lease, only while (volunteer, token) still hold it (see grant.lua for its form):
-- 'done': its upload was accepted, and the lease is final; 'release': its upload was refused, and
-- the shard may be leased again at once; 'extend': its holder renews it while it trains.
-- KEYS: leases hash
-- ARGV: field, volunteer, token, operation, new expiry (extend)
-- Returns 1 if the lease changed, 0 if it is not theirs (any more), or final
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local v, t, b, e, s = string.match(value, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
if v ~= ARGV[2] or t ~= ARGV[3] or s ~= 'live' then return 0 end
if ARGV[4] == 'done' then
  redis.call('HSET', KEYS[1], ARGV[1], table.concat({v, t, b, e, 'done'}, '|'))
elseif ARGV[4] == 'release' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[1], 'x:' .. v, 1)  -- it dropped out of the round: it caps no one's share
elseif ARGV[4] == 'extend' then
  if tonumber(ARGV[5]) <= tonumber(e) then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], table.concat({v, t, b, ARGV[5], 'live'}, '|'))
end
return 1
