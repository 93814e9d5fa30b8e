-- ARGV[6] the request's final cost (0 refunds it all).
--
-- Returns {code, balance, delta}: code 0 settled (delta is the change to the
-- balance), 2 settled before (nothing written), 3 no charge with this request
-- id (nothing written).
local actual = tonumber(ARGV[6])

local marker = redis.call('GET', KEYS[2])
if not marker then
  return {3, 0, 0}
end
local charged, feature, from_purchased, bal, state, ps =
  string.match(marker, '^(%-?%d+) (%S+) (%d+) (%-?%d+) (%a) (%-?%d+)')
charged, from_purchased, ps = tonumber(charged), tonumber(from_purchased), tonumber(ps)
if state ~= 'c' then
  return {2, tonumber(bal), 0}
end

local acc = open(KEYS[1])
local before = balance(acc)
local diff = actual - charged
if diff > 0 then
  from_purchased = from_purchased + spend(acc, diff)
elseif diff < 0 then
  from_purchased = from_purchased - give_back(acc, -diff, from_purchased)
end
-- Usage of a period that has ended stays with that period.
if diff ~= 0 and acc.ps == ps then
  add_used(acc, feature, diff)
end
local kind = 'settle'
if actual == 0 then kind = 'refund' end
if diff ~= 0 then
  event(acc, kind, balance(acc) - before, feature, ARGV[7])
end
commit(KEYS[1], KEYS[3], acc)
redis.call('SET', KEYS[2], table.concat({str(actual), feature, str(from_purchased),
  str(balance(acc)), 's', str(ps)}, ' '), 'KEEPTTL')
return {0, balance(acc), balance(acc) - before}
