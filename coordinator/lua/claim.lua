--#include due
-- Take a round for aggregation: open with its quorum met (and its replicas in) or past its deadline, or
-- aggregating under a claim whose lease ran out (its aggregator died).
-- KEYS: round hash
-- ARGV: owner, now, lease seconds
-- Each claim counts as an attempt ('attempts'), so a round that cannot be merged
-- is failed after a bounded number of them instead of retried forever.
-- Returns 'claimed' | 'not-due' | 'held' (another live claim) | 'closed' (done, failed or missing)
local now = tonumber(ARGV[2])
local why = due(redis.call('HMGET', KEYS[1], unpack(DUE_FIELDS)), now)
if why == 'not-due' or why == 'held' or why == 'closed' then return why end
redis.call('HSET', KEYS[1], 'status', 'aggregating', 'claim_owner', ARGV[1],
           'claim_until', tostring(now + tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'claimed'
