-- KEYS: account, events, holds.
--
-- Lists the org's extra grants: live and pending, and those that ended in
-- the last 90 days (older ones are dropped).
-- Returns {code, n, then n id and record pairs, account...}: OK, or
-- NOT_FOUND when Redis holds nothing for the org.

--#include lib/holds.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]

local acc = load(account_key, true)
if not acc then return {NOT_FOUND} end
sweep(acc, holds_key)
all_full(acc)
local out = {OK, 0}
local old = {}
local ids = {}
for id in pairs(acc.records) do ids[id] = true end
for id in pairs(acc.gmap or {}) do ids[id] = true end
for id in pairs(ids) do
  local g = grant_of(acc, id)
  if g.ended > 0 and g.ended + ENDED_KEPT_MS <= srv_now() then
    old[#old + 1] = 'g:' .. id
  else
    out[#out + 1] = id
    out[#out + 1] = grant_str(g)
  end
end
out[2] = (#out - 2) / 2
if #acc.events > 0 or acc.gdirty or acc.gl_dirty then
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
end
if #old > 0 then redis.call('HDEL', account_key, unpack(old)) end
return reply(acc, out)
