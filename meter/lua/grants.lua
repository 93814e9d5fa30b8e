-- KEYS: account, events, holds, grant references.
--
-- Lists the org's extra grants: live and pending, and those that ended in
-- the last 90 days (older ones are dropped, with their references).
-- Returns {code, n, then n id and grant pairs (grant_view), account...}:
-- OK, or NOT_FOUND when Redis holds nothing for the org.

--#include lib/holds.lua

local bad = check_types({'hash', 'list', 'hash', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key, grefs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local acc = load(account_key, true)
if not acc then return {NOT_FOUND} end
sweep(acc, holds_key)
all_full(acc)
grant_refs(acc, grefs_key)
local out = {OK, 0}
local old, old_refs = {}, {}
local ids = {}
for id in pairs(acc.records) do ids[id] = true end
for id in pairs(acc.gmap or {}) do ids[id] = true end
for id in pairs(ids) do
  local g = grant_of(acc, id)
  if g.ended > 0 and g.ended + ENDED_KEPT_MS <= srv_now() then
    old[#old + 1] = 'g:' .. id
    if acc.grefs[id] then old_refs[#old_refs + 1] = id end
  else
    local r = acc.grefs[id]
    if r then g.ref, g.reason = r[1], r[2] end
    out[#out + 1] = id
    out[#out + 1] = grant_view(g)
  end
end
out[2] = (#out - 2) / 2
if #acc.events > 0 or acc.gdirty or acc.gl_dirty then
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
end
if #old > 0 then redis.call('HDEL', account_key, unpack(old)) end
if #old_refs > 0 then redis.call('HDEL', grefs_key, unpack(old_refs)) end
return reply(acc, out)
