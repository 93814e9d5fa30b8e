-- Starts a new period now, on the plan waiting for it if there is one.
-- KEYS[3] is the recharge's marker: a recharge sent again after a lost
-- reply finds it (for an hour) and changes nothing.
-- Returns {0, account...}, or {2, account...} for a repeat.
local acc = open(KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  if #acc.events > 0 then commit(KEYS[1], KEYS[2], acc) end
  return reply(acc, {2})
end
local before = balance(acc)
start_period(acc, math.floor(now_ms / 1000))
event(acc, 'recharge', balance(acc) - before, '', 'manual')
commit(KEYS[1], KEYS[2], acc)
redis.call('SET', KEYS[3], '1', 'EX', 3600)
return reply(acc, {0})
