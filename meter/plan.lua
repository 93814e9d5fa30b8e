-- KEYS: account, events, holds. ARGV[8] allowance, ARGV[9] recharge month.
--
-- An org without a plan of its own starts a new period on this plan at once;
-- a change to an org's own plan waits for the next recharge.
-- Returns {OK, account...}.
local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local allowance = tonumber(ARGV[8])
local month = tonumber(ARGV[9])

local acc = load(account_key, true)
if not acc then
  acc = new_account(allowance, month)
  acc.own = 1
  start_period(acc, math.floor(now_ms / 1000))
  event(acc, 'plan', balance(acc), '', str(allowance) .. '/' .. str(month))
else
  sweep(acc, holds_key)
  if acc.own ~= 1 then
    local before = balance(acc)
    acc.a, acc.m, acc.own = allowance, month, 1
    start_period(acc, math.floor(now_ms / 1000))
    event(acc, 'plan', balance(acc) - before, '', str(allowance) .. '/' .. str(month))
  elseif acc.a == allowance and acc.m == month then
    if acc.pa then
      acc.pa, acc.pm = nil, nil
      event(acc, 'plan', 0, '', str(allowance) .. '/' .. str(month))
    end
  elseif acc.pa ~= allowance or acc.pm ~= month then
    acc.pa, acc.pm = allowance, month
    event(acc, 'plan', 0, '', str(allowance) .. '/' .. str(month))
  end
end
commit(account_key, events_key, acc)
write_holds(holds_key, acc)
return reply(acc, {OK})
