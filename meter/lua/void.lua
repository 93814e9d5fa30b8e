-- KEYS: account, request marker, call log, holds, budgets. ARGV[8] request id, ARGV[9]
-- attempt id, ARGV[10] marker lifetime in seconds.
--
-- Makes sure the attempt's charge, whose outcome the gateway could not
-- learn, does not stand: a charge that ran is refunded; one that has not run
-- yet never will (a void marker stops it). A charge that another attempt was
-- answered with as a replay stands.
-- Returns {code, delta}: OK done (delta is the refund, 0 if nothing had been
-- charged), REPEAT nothing to do.

--#include lib/calls.lua

local bad = check_types({'hash', 'string', 'list', 'hash', 'hash'})
if bad then return bad end
local account_key, marker_key, calls_key, holds_key, budgets_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local request_id = ARGV[8]
local attempt = ARGV[9]
local marker_ttl = ARGV[10]

local m = parse_marker(redis.call('GET', marker_key))
if not m then
  write_marker(marker_key, {cost = 0, feature = '-', fa = 0, fp = 0, fd = 0, balance = 0, state = VOID,
    pn = 0, attempt = attempt, relied = '0'}, marker_ttl)
  return {OK, 0}
end
if m.attempt ~= attempt or m.state ~= CHARGED or m.relied == '1' then
  return {REPEAT, 0}
end
local acc = open(account_key)
sweep(acc, holds_key)
local delta = settle_to(acc, m, 0, request_id, true, budgets_key)
commit(account_key, calls_key, acc, true)
write_holds(holds_key, acc)
write_marker(marker_key, m)
return {OK, delta}
