-- ARGV[6] request id, ARGV[7] attempt id, ARGV[8] marker lifetime in seconds.
--
-- Makes sure the attempt's charge, whose outcome the gateway could not
-- learn, does not stand: a charge that ran is refunded; one that has not run
-- yet never will (a void marker stops it). A charge that another attempt was
-- answered with as a replay stands.
-- Returns {code, delta}: 0 done (delta is the refund, 0 if nothing had been
-- charged), 2 nothing to do.
local attempt = ARGV[7]
local m = parse_marker(redis.call('GET', KEYS[2]))
if not m then
  write_marker(KEYS[2], {cost = 0, feature = '-', from_purchased = 0, balance = 0, state = 'x',
    ps = 0, attempt = attempt, relied = '0'}, ARGV[8])
  return {0, 0}
end
if m.attempt ~= attempt or m.state ~= 'c' or m.relied == '1' then
  return {2, 0}
end
local acc = open(KEYS[1])
local delta = settle_to(acc, m, 0, ARGV[6])
commit(KEYS[1], KEYS[3], acc)
write_marker(KEYS[2], m)
return {0, delta}
