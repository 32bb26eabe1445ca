-- Take a round for aggregation: open with its quorum met (and its replicas in) or past its deadline, or
-- aggregating under a claim whose lease ran out (its aggregator died).
-- KEYS: round hash
-- ARGV: owner, now, lease seconds
-- Each claim counts as an attempt ('attempts'), so a round that cannot be merged
-- is failed after a bounded number of them instead of retried forever.
-- Returns 'claimed' | 'not-due' | 'held' (another live claim) | 'closed' (done, failed or missing)
local r = redis.call('HMGET', KEYS[1], 'status', 'accepted', 'quorum', 'deadline', 'claim_until',
                     'replicas', 'replicas_expected')
local now = tonumber(ARGV[2])
local status = r[1]
if status == 'open' then
  -- due: the quorum met and every replica in (init --replicate), or the deadline passed
  local met = tonumber(r[2]) >= tonumber(r[3]) and tonumber(r[6] or '0') >= tonumber(r[7] or '0')
  if not met and tonumber(r[4]) > now then return 'not-due' end
elseif status == 'aggregating' then
  if tonumber(r[5]) > now then return 'held' end
else
  return 'closed'
end
redis.call('HSET', KEYS[1], 'status', 'aggregating', 'claim_owner', ARGV[1],
           'claim_until', tostring(now + tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'claimed'
