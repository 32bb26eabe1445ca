-- Take a revoked volunteer out of one round: its leases go (their shards are offered again) and,
-- while the round is open, its accepted copies stop counting. Where its copy was a shard's
-- accepted one and another volunteer's replica is in, the replica becomes the shard's copy and
-- a new replica is wanted. A round already aggregating is left to the merge, which refuses the
-- copies of revoked volunteers (coordinator.revocation.split_revoked).
-- KEYS: round hash, accepted hash, replicas hash, leases hash
-- ARGV: volunteer
-- Returns {leases released, copies withdrawn...}: the withdrawn copies' keys, to be deleted.
-- Accepted copies are named ct:kept:RUN:round:N:upload:VOLUNTEER:SHARD:TOKEN.
local function owner(copy) return string.match(copy, ':upload:([^:]+):[^:]+:[^:]+$') end
local name = ARGV[1]
local open = redis.call('HGET', KEYS[1], 'status') == 'open'
local released = 0
local leases = redis.call('HGETALL', KEYS[4])
for i = 1, #leases, 2 do
  local v, s = string.match(leases[i + 1], '^([^|]*)|[^|]*|[^|]*|[^|]*|([^|]*)$')
  if v == name and (s == 'live' or open) then
    redis.call('HDEL', KEYS[4], leases[i])
    released = released + 1
  end
end
if released > 0 then redis.call('HSET', KEYS[4], 'x:' .. name, 1) end
local withdrawn = {released}
if not open then return withdrawn end
local replicas = redis.call('HGETALL', KEYS[3])
for i = 1, #replicas, 2 do
  if owner(replicas[i + 1]) == name then
    redis.call('HDEL', KEYS[3], replicas[i])
    redis.call('HINCRBY', KEYS[1], 'replicas', -1)
    withdrawn[#withdrawn + 1] = replicas[i + 1]
  end
end
local accepted = redis.call('HGETALL', KEYS[2])
for i = 1, #accepted, 2 do
  local field, copy = accepted[i], accepted[i + 1]
  if owner(copy) == name then
    local replica = redis.call('HGET', KEYS[3], field)
    if replica then
      redis.call('HSET', KEYS[2], field, replica)
      redis.call('HDEL', KEYS[3], field)
      redis.call('HINCRBY', KEYS[1], 'replicas', -1)
      local lease = redis.call('HGET', KEYS[4], field .. ':r')
      if lease then
        redis.call('HSET', KEYS[4], field, lease)
        redis.call('HDEL', KEYS[4], field .. ':r')
      end
    else
      redis.call('HDEL', KEYS[2], field)
      redis.call('HINCRBY', KEYS[1], 'accepted', -1)
    end
    withdrawn[#withdrawn + 1] = copy
  end
end
return withdrawn
