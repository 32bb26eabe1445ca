-- Open round N+1 of a run, atomically: refuse while round N is open or aggregating.
-- KEYS: rounds counter, version, round N hash, round N+1 hash, deadlines zset
-- ARGV: N (the counter the caller read), shards, quorum, now, deadline (absolute), deadline member
-- Returns {'opened', N+1, base_version} | {'round-open', N} | {'raced'} | {'unknown-run'}
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then return {'raced'} end
local version = redis.call('GET', KEYS[2])
if not version then return {'unknown-run'} end
if current > 0 then
  local status = redis.call('HGET', KEYS[3], 'status')
  if status == 'open' or status == 'aggregating' then return {'round-open', current} end
end
redis.call('SET', KEYS[1], current + 1)
redis.call('HSET', KEYS[4], 'status', 'open', 'shards', ARGV[2], 'quorum', ARGV[3],
           'deadline', ARGV[5], 'base_version', version, 'posted_at', ARGV[4],
           'accepted', 0, 'rejected', 0, 'late', 0, 'uplink_bytes', 0, 'downlink_bytes', 0,
           'claim_until', 0)
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[6])
return {'opened', current + 1, tonumber(version)}
