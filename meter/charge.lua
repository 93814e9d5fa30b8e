-- ARGV[6] feature, ARGV[7] cost, ARGV[8] 1 for overdraft, ARGV[9] overdraft
-- limit (-1: none), ARGV[10] request id, ARGV[11] marker lifetime in seconds.
--
-- Returns {code, balance, charged}: code 0 charged, 1 refused (nothing
-- written), 2 a replay of an earlier charge with this request id (its result).
-- A request refunded in full is no longer charged, so its id may charge again.
local feature = ARGV[6]
local cost = tonumber(ARGV[7])
local overdraft = ARGV[8] == '1'
local limit = tonumber(ARGV[9])

local marker = redis.call('GET', KEYS[2])
if marker then
  local charged, _, _, bal, state = string.match(marker, '^(%-?%d+) (%S+) (%d+) (%-?%d+) (%a)')
  if state ~= 's' or charged ~= '0' then
    return {2, tonumber(bal), tonumber(charged)}
  end
end

local acc = open(KEYS[1])
local bal = balance(acc)
if (not overdraft and bal < cost) or (overdraft and limit >= 0 and bal - cost < -limit) then
  return {1, bal, 0}
end

local from_purchased = spend(acc, cost)
add_used(acc, feature, cost)
event(acc, 'charge', -cost, feature, ARGV[10])
commit(KEYS[1], KEYS[3], acc)
-- cost, feature, credits taken from purchased, balance after, state, period
redis.call('SET', KEYS[2], table.concat({str(cost), feature, str(from_purchased),
  str(balance(acc)), 'c', str(acc.ps)}, ' '), 'EX', ARGV[11])
return {0, balance(acc), cost}
