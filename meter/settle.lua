-- ARGV[6] the request's final cost (0 refunds it all), ARGV[7] request id.
--
-- Returns {code, balance, delta}: code 0 settled (delta is the change to the
-- balance), 2 settled before (nothing written), 3 no charge with this request
-- id (nothing written).
local m = parse_marker(redis.call('GET', KEYS[2]))
if not m or m.state == 'x' then
  return {3, 0, 0}
end
if m.state ~= 'c' then
  return {2, m.balance, 0}
end
local acc = open(KEYS[1])
local delta = settle_to(acc, m, tonumber(ARGV[6]), ARGV[7])
commit(KEYS[1], KEYS[3], acc)
write_marker(KEYS[2], m)
return {0, balance(acc), delta}
