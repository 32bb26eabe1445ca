--#include due
-- Why each round is due (the watcher's question, coordinator.rounds.janitor), in one call.
-- KEYS: round hashes; ARGV: now
-- Returns one entry per key: 'deadline' | 'count' | 'abandoned' | 'not-due' | 'held' | 'closed'
local out = {}
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  out[i] = due(redis.call('HMGET', key, unpack(DUE_FIELDS)), now)
end
return out
