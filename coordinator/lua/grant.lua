-- Give one shard (an asynchronous run: one job) of a round to one volunteer for a bounded time.
-- A lease is "VOLUNTEER|TOKEN|BASE|EXPIRES|STATE" under field SHARD, or SHARD:r for the second
-- volunteer of a replicated shard (init --replicate); STATE is 'live', or 'done' once its upload
-- was accepted (it is final: nothing replaces it). A lapsed live lease may be given to another.
-- KEYS: round hash, round accepted hash, leases hash, replicated set, replicas hash, seen zset,
--       the run's finished hash (asynchronous runs)
-- ARGV: shard, volunteer, token, now, lease seconds, the share of a round one volunteer may hold while
--       two or more are online (at least one shard, never all of them; 1: no limit), online window (seconds), '1' for an asynchronous run, TTL of the leases hash,
--       the job's field in the finished hash ("ROUND:SHARD")
-- The same request (volunteer and token) asked again while its lease is live is granted again, as it was.
-- Returns {outcome, field, base_version, expires}: outcome 'granted' | 'unknown' (no such round or
-- shard) | 'closed' (the round ended) | 'taken' (its upload was accepted) | 'leased' (another holds it)
-- | 'share' (the volunteer holds its fair share of the round)
local r = redis.call('HMGET', KEYS[1], 'status', 'shards', 'base_version')
local shard = tonumber(ARGV[1])
if not r[1] or shard >= tonumber(r[2] or '0') then return {'unknown'} end
local now = tonumber(ARGV[4])
local who = ARGV[2]
local async = ARGV[8] == '1'
redis.call('ZADD', KEYS[6], now, who)
if async then
  if redis.call('HEXISTS', KEYS[7], ARGV[10]) == 1 then return {'taken'} end
elseif r[1] ~= 'open' then
  return {'closed'}
end
local function parse(value)
  if not value then return nil end
  local v, t, b, e, s = string.match(value, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  if not v or not tonumber(e) then return nil end
  return {volunteer = v, token = t, base = b, expires = tonumber(e), state = s}
end
local function held(lease) return lease and (lease.state == 'done' or lease.expires > now) end
local field = ARGV[1]
local first = parse(redis.call('HGET', KEYS[3], field))
local accepted = (not async) and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1
if held(first) or accepted then
  -- the same request again (a volunteer asks again when no answer came: one lost with a failed-over
  -- primary): the same answer, not a refusal of its own lease
  if first and first.volunteer == who and first.token == ARGV[3] and first.state == 'live' and not accepted then
    return {'granted', field, tonumber(first.base), tostring(first.expires)}
  end
  if first and first.volunteer == who then return {accepted and 'taken' or 'leased'} end
  local wanted = (not async) and redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1
                 and redis.call('HEXISTS', KEYS[5], ARGV[1]) == 0
  if not wanted then return {accepted and 'taken' or 'leased'} end
  field = ARGV[1] .. ':r'
  if held(parse(redis.call('HGET', KEYS[3], field))) then return {'leased'} end
end
if not async then
  -- another volunteer online that has not dropped out of this round (a refused upload, a lapsed
  -- lease: field x:NAME) caps this one's share; one that dropped out does not hold the round up
  local n = tonumber(r[2])
  local limit = n
  local online = redis.call('ZRANGEBYSCORE', KEYS[6], now - tonumber(ARGV[7]), '+inf', 'LIMIT', 0, 64)
  for i = 1, (tonumber(ARGV[6]) < 1 and #online or 0) do
    if online[i] ~= who and redis.call('HEXISTS', KEYS[3], 'x:' .. online[i]) == 0 then
      limit = math.max(1, math.min(n - 1, math.ceil(tonumber(ARGV[6]) * n - 1e-9)))
      break
    end
  end
  local mine = 0
  local values = redis.call('HVALS', KEYS[3])
  for i = 1, #values do
    local lease = parse(values[i])
    if lease and lease.volunteer == who and held(lease) then mine = mine + 1 end
  end
  if mine >= limit then return {'share'} end
end
local previous = parse(redis.call('HGET', KEYS[3], field))
if previous and previous.volunteer ~= who then redis.call('HSET', KEYS[3], 'x:' .. previous.volunteer, 1) end
local expires = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[3], field, table.concat({who, ARGV[3], r[3], tostring(expires), 'live'}, '|'))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[9]))
return {'granted', field, tonumber(r[3]), tostring(expires)}
