-- One step of the sweep of a train queue: entries longer than a task message go.
-- KEYS[1]: the list. ARGV: first index, count, longest entry. Returns {entries looked at, removed}.
-- LREM, not LSET: a full Redis refuses LSET, and this sweep is what frees it.
local first, count, longest = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local items = redis.call('LRANGE', KEYS[1], first, first + count - 1)
local removed = 0
for _, entry in ipairs(items) do
    if #entry > longest then
        removed = removed + redis.call('LREM', KEYS[1], 1, entry)
    end
end
return {#items, removed}
