-- ARGV[6] allowance, ARGV[7] recharge month.
--
-- An org without a plan of its own starts a new period on this plan at once;
-- a change to an org's own plan waits for the next recharge.
-- Returns {0, account...}.
local allowance = tonumber(ARGV[6])
local month = tonumber(ARGV[7])

local acc = load(KEYS[1])
if not acc then
  acc = new_account(allowance, month)
  acc.own = 1
  start_period(acc, math.floor(now_ms / 1000))
  event(acc, 'plan', acc.rem, '', str(allowance) .. '/' .. str(month))
elseif acc.own ~= 1 then
  local before = balance(acc)
  acc.a, acc.m, acc.own = allowance, month, 1
  start_period(acc, math.floor(now_ms / 1000))
  event(acc, 'plan', balance(acc) - before, '', str(allowance) .. '/' .. str(month))
elseif acc.a == allowance and acc.m == month then
  if acc.pa then
    acc.pa, acc.pm, acc.plan_dirty = nil, nil, true
    event(acc, 'plan', 0, '', str(allowance) .. '/' .. str(month))
  end
elseif acc.pa ~= allowance or acc.pm ~= month then
  acc.pa, acc.pm = allowance, month
  event(acc, 'plan', 0, '', str(allowance) .. '/' .. str(month))
end
commit(KEYS[1], KEYS[2], acc)
return reply(acc, {0})
