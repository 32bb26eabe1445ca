-- Extend our claim on a round while a long aggregation works.
-- KEYS: round hash
-- ARGV: owner, new claim_until
-- Returns 'renewed' | 'lost' (another aggregator took the round over, or it ended)
if redis.call('HGET', KEYS[1], 'claim_owner') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'aggregating' then return 'lost' end
redis.call('HSET', KEYS[1], 'claim_until', ARGV[2])
return 'renewed'
