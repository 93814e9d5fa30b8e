-- KEYS: account, events, the recharge's marker, holds.
--
-- Starts a new period now, on the plan waiting for it if there is one.
-- The marker makes a recharge sent again after a lost reply a repeat (for
-- an hour) that changes nothing.
-- Returns {OK, account...}, or {REPEAT, account...} for a repeat.
local bad = check_types({'hash', 'list', 'string', 'hash'})
if bad then return bad end
local account_key, events_key, marker_key, holds_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local acc = open(account_key, true)
sweep(acc, holds_key)
if redis.call('EXISTS', marker_key) == 1 then
  if #acc.events > 0 then
    commit(account_key, events_key, acc)
    write_holds(holds_key, acc)
  end
  return reply(acc, {REPEAT})
end
local before = balance(acc)
start_period(acc, math.floor(now_ms / 1000))
event(acc, 'recharge', balance(acc) - before, '', 'manual')
commit(account_key, events_key, acc)
write_holds(holds_key, acc)
redis.call('SET', marker_key, '1', 'EX', 3600)
return reply(acc, {OK})
