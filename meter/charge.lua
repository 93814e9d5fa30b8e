-- KEYS[4] the org's leases. ARGV[6] feature, ARGV[7] cost, ARGV[8] 1 for overdraft, ARGV[9] overdraft
-- limit (-1: none), ARGV[10] request id, ARGV[11] marker lifetime in seconds,
-- ARGV[12] attempt id.
--
-- Returns {code, balance, charged}: code 0 charged (or this attempt's own
-- charge, run before and repeated after a lost reply), 1 refused (nothing
-- written), 2 a replay of another attempt's charge with this request id (its
-- result), 5 this attempt was voided (nothing charged). A request refunded in
-- full, or voided by another attempt, is free to charge again.
local feature = ARGV[6]
local cost = tonumber(ARGV[7])
local overdraft = ARGV[8] == '1'
local limit = tonumber(ARGV[9])
local attempt = ARGV[12]

local m = parse_marker(redis.call('GET', KEYS[2]))
if m and m.attempt == attempt then
  if m.state == 'x' then return {5, 0, 0} end
  return {0, m.balance, m.cost}
end
if m and m.state ~= 'x' and not (m.state == 's' and m.cost == 0) then
  if m.relied ~= '1' then
    m.relied = '1'
    write_marker(KEYS[2], m)
  end
  return {2, m.balance, m.cost}
end

local acc = open(KEYS[1])
local bal = balance(acc)
-- Credits the gateways hold in leases are spoken for.
local free = bal - reserved(KEYS[4])
if (not overdraft and free < cost) or (overdraft and limit >= 0 and free - cost < -limit) then
  return {1, bal, 0}
end

local from_purchased = spend(acc, cost)
add_used(acc, feature, cost)
event(acc, 'charge', -cost, feature, ARGV[10])
commit(KEYS[1], KEYS[3], acc)
write_marker(KEYS[2], {cost = cost, feature = feature, from_purchased = from_purchased,
  balance = balance(acc), state = 'c', ps = acc.ps, attempt = attempt, relied = '0'}, ARGV[11])
return {0, balance(acc), cost}
