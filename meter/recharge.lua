-- Starts a new period now, on the plan waiting for it if there is one.
-- Returns {0, account...}.
local acc = open(KEYS[1])
local before = balance(acc)
start_period(acc, math.floor(now_ms / 1000))
event(acc, 'recharge', balance(acc) - before, '', 'manual')
commit(KEYS[1], KEYS[2], acc)
return reply(acc, {0})
