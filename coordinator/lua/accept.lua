--#include due
-- Count a validated upload toward the quorum, once per shard (first valid wins).
-- The fencing token of an upload is its key: the same key again is a 'repeat',
-- another key for an accepted shard a 'duplicate', bytes identical to an upload
-- accepted for another shard 'identical' (a copy earns nothing). For a shard posted
-- twice (init --replicate), the first upload of it from a *second* volunteer is kept
-- as its 'replica', to be compared with the first at the merge; it is no quorum vote.
-- A copy is counted in one round only (the run's taken set): in an asynchronous run an
-- upload redelivered after its buffer was merged is a 'repeat', not a vote in the next one.
-- KEYS: round hash, round accepted hash, round digests hash, replicated set, replicas hash,
--       the run's taken set
-- ARGV: shard, key of the accepted copy, sha256 of the upload, volunteer, TTL of the taken set
-- Returns {outcome, due}: outcome 'accepted' | 'replica' | 'repeat' | 'duplicate' |
-- 'identical' | 'late'; due is 1 while the round is open with its quorum met and its
-- replicas in, so a redelivered validation still triggers aggregation.
if redis.call('HGET', KEYS[1], 'status') ~= 'open' then
  redis.call('HINCRBY', KEYS[1], 'late', 1)
  return {'late', 0}
end
local outcome = 'accepted'
local current = redis.call('HGET', KEYS[2], ARGV[1])
local replica = redis.call('HGET', KEYS[5], ARGV[1])
if current == ARGV[2] or replica == ARGV[2] or redis.call('SISMEMBER', KEYS[6], ARGV[2]) == 1 then
  outcome = 'repeat'
elseif current then
  -- accepted copies are named ct:run:RUN:round:N:upload:VOLUNTEER:SHARD:TOKEN
  local first = string.match(current, ':upload:([^:]+):[^:]+:[^:]+$')
  if (not replica) and first ~= ARGV[4]
     and redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
    redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
    redis.call('HINCRBY', KEYS[1], 'replicas', 1)
    outcome = 'replica'
  else
    outcome = 'duplicate'
  end
elseif redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
  outcome = 'identical'
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'accepted', 1)
  redis.call('SADD', KEYS[6], ARGV[2])
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[5]))
end
-- due while the round is open with its quorum met and its replicas in (due.lua's count)
local met = 0
if counted(redis.call('HMGET', KEYS[1], unpack(DUE_FIELDS))) then met = 1 end
return {outcome, met}
