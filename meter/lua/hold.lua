-- KEYS: account, events, holds. ARGV[8] hold id, ARGV[9] amount, ARGV[10]
-- lifetime in ms, ARGV[11] feature, ARGV[12] who made it ('' for none).
--
-- Sets amount credits of the available balance aside until the hold is
-- captured, released or expires (by Redis' clock).
-- Returns {code, state, amount, until_ms, feature, account...}: OK held, REPEAT a hold
-- with this id exists (its record; nothing written), REFUSED the available
-- balance is short (nothing written).

--#include lib/holds.lua
--#include lib/by.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]
local amount = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local feature = ARGV[11]
local by = ARGV[12]

local acc = load(account_key, true)
local fresh = not acc
if fresh then
  acc = new_account(def_allowance, def_month)
end
sweep(acc, holds_key, true)
local h = get_hold(acc, holds_key, id)
if h then
  return reply(acc, {REPEAT, h.state, hold_amount(h) + h.cap, h.untl, h.feature})
end
if available(acc) < amount then
  return reply(acc, {REFUSED, '-', 0, 0, '-'})
end
if fresh then
  event(acc, 'grant', acc.rem, '', 'default-plan')
end
h = new_hold(acc, feature)
hold_more(acc, h, amount)
h.state, h.untl = LIVE, srv_now() + ttl
note_expiry(acc, h.untl)
event(acc, 'hold', 0, feature, 'hold:' .. id)
sign(acc, 'hold', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc, {[id] = h})
return reply(acc, {OK, h.state, amount, h.untl, h.feature})
