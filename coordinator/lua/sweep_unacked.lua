-- One step of the sweep of kombu's unacked bookkeeping, which volunteers may write.
-- KEYS[1]: the unacked hash (delivery tag -> message), KEYS[2]: its index (tag -> time).
-- ARGV: hash cursor, index cursor, count, longest tag, longest entry, oldest time kept, newest time kept.
-- A hash field goes (with its index entry) when it has no index entry, a tag or entry too long, or a
-- time outside the window; an index entry goes when it has no field or is out of the window. Returns
-- {next hash cursor, next index cursor, entries deleted, bytes of the fields kept}.
local count, longest_tag, longest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local oldest, newest = tonumber(ARGV[6]), tonumber(ARGV[7])
local deleted, kept = 0, 0
local function out_of_window(score)
    return score == nil or score < oldest or score > newest
end
local hash_cursor, index_cursor = ARGV[1], ARGV[2]
if hash_cursor ~= 'done' then
    local scan = redis.call('HSCAN', KEYS[1], hash_cursor, 'COUNT', count)
    local items = scan[2]
    for i = 1, #items, 2 do
        local tag, entry = items[i], items[i + 1]
        local score = tonumber(redis.call('ZSCORE', KEYS[2], tag))
        if #tag > longest_tag or #entry > longest or out_of_window(score) then
            redis.call('HDEL', KEYS[1], tag)
            redis.call('ZREM', KEYS[2], tag)
            deleted = deleted + 1
        else
            kept = kept + #tag + #entry
        end
    end
    hash_cursor = scan[1] == '0' and 'done' or scan[1]
end
if index_cursor ~= 'done' then
    local scan = redis.call('ZSCAN', KEYS[2], index_cursor, 'COUNT', count)
    local items = scan[2]
    for i = 1, #items, 2 do
        local tag, score = items[i], tonumber(items[i + 1])
        if #tag > longest_tag or out_of_window(score) or redis.call('HEXISTS', KEYS[1], tag) == 0 then
            redis.call('ZREM', KEYS[2], tag)
            redis.call('HDEL', KEYS[1], tag)
            deleted = deleted + 1
        end
    end
    index_cursor = scan[1] == '0' and 'done' or scan[1]
end
return {hash_cursor, index_cursor, deleted, kept}
