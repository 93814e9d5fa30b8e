-- KEYS: account, events, holds.
--
-- Lists the org's holds, leases included, with any expiry that fell due
-- written. Returns {OK, n, then n times id, state, amount, captured,
-- until_ms, feature, last report ms (a lease's; 0 for others)}, or
-- {NOT_FOUND} when Redis holds nothing for the org.

--#include lib/holds.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]

local acc = load(account_key)
if not acc then return {NOT_FOUND} end
sweep(acc, holds_key, true)
if #acc.events > 0 or acc.hx_dirty then
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
end
local out = {OK, 0}
local n = 0
for id, e in pairs(acc.swept) do
  local h = e[1]
  if h then
    n = n + 1
    for _, v in ipairs({id, h.state, hold_amount(h), h.cap, h.untl, h.feature, h.rep}) do
      table.insert(out, v)
    end
  end
end
out[2] = n
return out
