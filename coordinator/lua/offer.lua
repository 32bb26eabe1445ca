-- Record the shards of a round offered again, and say which to post: the check and the record in
-- one step, so two aggregators looking at once post a shard once.
-- KEYS: the round's offers hash: field SHARD (when it was last offered), SHARD:at (when it was last
--       posted at a refusal), SHARD:waited and SHARD:refused (how often it was offered for each reason)
-- ARGV: now, the offer period (seconds), TTL of the hash, when the round was posted, then pairs
--       SHARD, REASON: 'waited' (nobody took its last offer, or its lease lapsed, and the queue is
--       empty: due once its last offer is a period old) or 'refused' (a lease of it was refused,
--       and the asker dropped its message: due once its last post at a refusal is a period old)
-- Returns the shards to post.
local now, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 5, #ARGV, 2 do
  local shard, reason = ARGV[i], ARGV[i + 1]
  local last
  if reason == 'refused' then
    last = tonumber(redis.call('HGET', KEYS[1], shard .. ':at') or '0') or 0
  else
    last = math.max(tonumber(redis.call('HGET', KEYS[1], shard) or '0') or 0, tonumber(ARGV[4]) or 0)
  end
  if now - last >= period then
    redis.call('HSET', KEYS[1], shard, ARGV[1])
    if reason == 'refused' then redis.call('HSET', KEYS[1], shard .. ':at', ARGV[1]) end
    redis.call('HINCRBY', KEYS[1], shard .. ':' .. reason, 1)
    out[#out + 1] = shard
  end
end
if #out > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3])) end
return out
