-- Whether a round is due for aggregation, and why: the one test that claim.lua, accept.lua and
-- the watcher (due_rounds.lua) share; lua_source() puts it in front of each script that names it
-- on its first line ("--#include due").
-- DUE_FIELDS: what HMGET must read of a round's hash, in this order.
local DUE_FIELDS = {'status', 'accepted', 'quorum', 'deadline', 'claim_until', 'replicas', 'replicas_expected'}

-- counted(r): its quorum is met and every replica is in (init --replicate).
local function counted(r)
  return tonumber(r[2]) >= tonumber(r[3]) and tonumber(r[6] or '0') >= tonumber(r[7] or '0')
end

-- due(r, now): 'deadline' | 'count' (open and due) | 'abandoned' (aggregating under a claim that
-- ran out: its aggregator died) | 'not-due' | 'held' (a live claim) | 'closed' (done, failed, gone)
local function due(r, now)
  if r[1] == 'open' then
    if tonumber(r[4]) <= now then return 'deadline' end
    if counted(r) then return 'count' end
    return 'not-due'
  elseif r[1] == 'aggregating' then
    if tonumber(r[5]) <= now then return 'abandoned' end
    return 'held'
  end
  return 'closed'
end
