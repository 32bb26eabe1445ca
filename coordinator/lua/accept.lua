-- Count a validated upload toward the quorum, once per shard (first valid wins).
-- The fencing token of an upload is its key: the same key again is a 'repeat',
-- another key for an accepted shard a 'duplicate', bytes identical to an upload
-- accepted for another shard 'identical' (a copy earns nothing).
-- KEYS: round hash, round accepted hash, round digests hash
-- ARGV: shard, key of the accepted copy, sha256 of the upload
-- Returns {outcome, due}: outcome 'accepted' | 'repeat' | 'duplicate' | 'identical' | 'late';
-- due is 1 while the round is open with its quorum met, so a redelivered validation
-- still triggers aggregation.
local r = redis.call('HMGET', KEYS[1], 'status', 'quorum')
if r[1] ~= 'open' then redis.call('HINCRBY', KEYS[1], 'late', 1) return {'late', 0} end
local outcome = 'accepted'
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current == ARGV[2] then
  outcome = 'repeat'
elseif current then
  outcome = 'duplicate'
elseif redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
  outcome = 'identical'
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'accepted', 1)
end
local due = 0
if tonumber(redis.call('HGET', KEYS[1], 'accepted')) >= tonumber(r[2]) then due = 1 end
return {outcome, due}
