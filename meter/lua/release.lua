-- KEYS: account, events, holds. ARGV[8] hold id, ARGV[9] '1' when an
-- operator knows the gateway of a lease is gone, ARGV[10] the reason,
-- ARGV[11] who released it ('' for none).
--
-- Gives a live hold's credits back. A gateway's lease is its gateway's
-- alone: it is released here only when it is unreported (its gateway did
-- not report within its lifetime) and the operator says the gateway is
-- gone. Returns {code, state, amount, until_ms, feature, account...}
-- (NOT_FOUND: {code} alone): OK
-- released, REPEAT released or expired before (nothing written), NOT_FOUND
-- no such hold, ENDED the hold was captured (nothing written), LEASE a lease
-- that may not be released so (nothing written), REFUSED gateway_gone for a
-- hold that is no lease (nothing written).

--#include lib/holds.lua
--#include lib/by.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]
local gone = ARGV[9] == '1'
local reason = ARGV[10]
if reason == '' then reason = nil end
local by = ARGV[11]

local acc, h = find_hold(account_key, holds_key, id)
if not h then
  return {NOT_FOUND}
end
if gone and not is_lease(id) then
  return reply(acc, {REFUSED, h.state, hold_amount(h), h.untl, h.feature})
end
if is_lease(id) and keeps(h) and not (gone and h.state == UNREPORTED) then
  return reply(acc, {LEASE, h.state, hold_amount(h), h.untl, h.feature})
end
if h.state == CAPTURED then
  return reply(acc, {ENDED, h.state, h.cap, h.untl, h.feature})
end
if not keeps(h) then
  if #acc.events > 0 or acc.hx_dirty then
    commit(account_key, events_key, acc)
    write_holds(holds_key, acc)
  end
  return reply(acc, {REPEAT, h.state, 0, h.untl, h.feature})
end
local amount = hold_amount(h)
local delta = hold_less(acc, h, amount)
h.state, h.untl = RELEASED, srv_now() + HOLD_KEPT_MS
event(acc, 'release', delta, h.feature, hold_ref(id), nil, reason)
sign(acc, 'release', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc, {[id] = h})
return reply(acc, {OK, h.state, 0, h.untl, h.feature})
