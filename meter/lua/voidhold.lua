-- KEYS: account, events, holds. ARGV[8] hold id.
--
-- Makes sure a hold whose outcome the gateway could not learn (it answered
-- 503; the hold had a reference of the gateway's own, so no one knows its
-- id) does not stand. A live hold is released. When there is no hold yet,
-- a released record of it is written, so that the hold, if it still
-- arrives, finds it and sets nothing aside (hold.lua answers a repeat). A
-- hold that ended (captured by an operator who found it, or expired) is
-- left as it is.
-- Returns {code}: OK released or kept from applying, REPEAT it had ended.

--#include lib/holds.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]

local acc = load(account_key, true)
if acc then
  sweep(acc, holds_key, true)
end
local h = acc and get_hold(acc, holds_key, id)
if h and h.state ~= LIVE then
  return {REPEAT}
end
if h then
  local delta = hold_less(acc, h, hold_amount(h))
  h.state, h.untl = RELEASED, srv_now() + HOLD_KEPT_MS
  event(acc, 'release', delta, h.feature, 'hold:' .. id, nil, 'a hold answered 503 is voided')
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc, {[id] = h})
  return {OK}
end
-- The record outlives any late arrival: a write waits seconds, not a day.
h = new_hold(acc or {pn = 0}, '-')
h.untl = srv_now() + HOLD_KEPT_MS
if acc then
  if #acc.events > 0 then commit(account_key, events_key, acc) end
  write_holds(holds_key, acc, {[id] = h})
else
  redis.call('HSET', holds_key, id, hold_str(h))
  if redis.call('PTTL', holds_key) < HOLD_KEPT_MS then
    redis.call('PEXPIRE', holds_key, HOLD_KEPT_MS)
  end
end
return {OK}
