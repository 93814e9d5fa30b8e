-- KEYS: account, events, holds. ARGV[8] hold id.
--
-- Gives a live hold's credits back. Returns {code, state, amount, until_ms,
-- feature, account...}: OK released, REPEAT released or expired before (nothing
-- written), NOT_FOUND no such hold, ENDED the hold was captured (nothing
-- written).
local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]

local acc, h = find_hold(account_key, holds_key, id)
if not h then
  return {NOT_FOUND}
end
if h.state == 'c' then
  return reply(acc, {ENDED, h.state, h.cap, h.untl, h.feature})
end
if h.state ~= 'l' then
  if #acc.events > 0 then
    commit(account_key, events_key, acc)
    write_holds(holds_key, acc)
  end
  return reply(acc, {REPEAT, h.state, 0, h.untl, h.feature})
end
local amount = hold_amount(h)
local delta = hold_less(acc, h, amount)
h.state, h.untl = 'r', srv_now() + HOLD_KEPT_MS
event(acc, 'release', delta, h.feature, 'hold:' .. id)
commit(account_key, events_key, acc)
write_holds(holds_key, acc, {[id] = h})
return reply(acc, {OK, h.state, 0, h.untl, h.feature})
