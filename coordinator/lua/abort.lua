-- End a run's open or aggregating round by hand: it fails with the given reason.
-- KEYS: round hash, deadlines zset
-- ARGV: deadline member, reason
-- Returns 'aborted' | 'not-active' (no such round, or it already ended)
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'open' and status ~= 'aggregating' then return 'not-active' end
redis.call('HSET', KEYS[1], 'status', 'failed', 'reason', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return 'aborted'
