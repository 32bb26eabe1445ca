-- Take the oldest announcements off the list, never sending one longer than an upload key can be.
-- Volunteers may append anything to the list: an entry too long is dropped here, on the server,
-- unread; a list longer than its cap loses its newest entries (their uploads stay, and the
-- aggregator's sweep validates them: an announcement is only a hint).
-- KEYS: the announcement list
-- ARGV: most entries to take, longest entry kept (bytes), most entries the list may hold
-- Returns {dropped, entries}: how many were dropped, and the entries taken, oldest first.
local cap = tonumber(ARGV[3])
local dropped = 0
local length = redis.call('LLEN', KEYS[1])
if length > cap then
  redis.call('LTRIM', KEYS[1], 0, cap - 1)
  dropped = length - cap
end
local longest = tonumber(ARGV[2])
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then break end
  if #entry <= longest then taken[#taken + 1] = entry else dropped = dropped + 1 end
end
return {dropped, taken}
