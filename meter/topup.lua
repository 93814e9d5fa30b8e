-- KEYS[2] the set of references applied. ARGV[6] amount, ARGV[7] reference,
-- ARGV[8] the most purchased credits an org may hold.
--
-- Returns {code, account...}: code 0 applied, 2 the reference was applied
-- before (nothing written), 4 the top-up would pass the limit (nothing written).
local amount = tonumber(ARGV[6])

if redis.call('SISMEMBER', KEYS[2], ARGV[7]) == 1 then
  local acc = load(KEYS[1]) or new_account(def_allowance, def_month)
  return reply(acc, {2})
end
local acc = open(KEYS[1])
if acc.pur + amount > tonumber(ARGV[8]) then
  return reply(acc, {4})
end
acc.pur = acc.pur + amount
event(acc, 'topup', amount, '', ARGV[7])
commit(KEYS[1], KEYS[3], acc)
redis.call('SADD', KEYS[2], ARGV[7])
return reply(acc, {0})
