-- KEYS: account, events, holds. ARGV[8] hold id, ARGV[9] credits to charge,
-- ARGV[10] who captured it ('' for none).
--
-- Charges the credits from the hold and releases the rest; usage above the
-- hold is charged from the available balance, into debt if it must (the
-- work was done). A hold that expired is charged all the same, from the
-- available balance, and its event says so.
-- Returns {code, state, captured, until_ms, feature, account...} (NOT_FOUND:
-- {code} alone): OK captured, REPEAT
-- captured before (its record; nothing written), NOT_FOUND no such hold,
-- ENDED the hold was released (nothing written), LEASE the hold is a
-- gateway's lease, which only its gateway captures (nothing written).

--#include lib/holds.lua
--#include lib/by.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]
local amount = tonumber(ARGV[9])
local by = ARGV[10]

local acc, h = find_hold(account_key, holds_key, id)
if not h then
  return {NOT_FOUND}
end
if is_lease(id) then
  return reply(acc, {LEASE, h.state, 0, h.untl, h.feature})
end
if h.state == CAPTURED then
  return reply(acc, {REPEAT, h.state, h.cap, h.untl, h.feature})
end
if h.state == RELEASED then
  return reply(acc, {ENDED, h.state, 0, h.untl, h.feature})
end
local ref = 'hold:' .. id
if h.state == EXPIRED then ref = ref .. ':expired' end
local delta = hold_capture(acc, h, amount)
delta = delta + hold_less(acc, h, hold_amount(h))
add_used(acc, h.feature, amount)
h.state, h.cap, h.untl = CAPTURED, amount, srv_now() + HOLD_KEPT_MS
event(acc, 'capture', delta, h.feature, ref)
sign(acc, 'capture', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc, {[id] = h})
return reply(acc, {OK, h.state, h.cap, h.untl, h.feature})
