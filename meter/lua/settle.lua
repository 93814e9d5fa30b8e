-- KEYS: account, request marker, call log, holds, budgets. ARGV[8] the request's final
-- cost, ARGV[9] request id, ARGV[10] 1 when the call failed and is refunded
-- (its request id is free again; the final cost is then 0), ARGV[11] the
-- attempt whose charge it settles ('-': whichever stands). A settle of an
-- attempt whose charge no longer stands (refunded, and the request id
-- charged again by a retry) finds nothing to settle.
--
-- Returns {code, balance, delta}: code OK settled (delta is the change to
-- the balance), REPEAT settled before (nothing written), NOT_FOUND no charge
-- with this request id (nothing written).

--#include lib/calls.lua

local bad = check_types({'hash', 'string', 'list', 'hash', 'hash'})
if bad then return bad end
local account_key, marker_key, calls_key, holds_key, budgets_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local actual = tonumber(ARGV[8])
local request_id = ARGV[9]

local m = parse_marker(redis.call('GET', marker_key))
if not m or m.state == VOID or (ARGV[11] ~= '-' and m.attempt ~= ARGV[11]) then
  return {NOT_FOUND, 0, 0}
end
if m.state ~= CHARGED then
  return {REPEAT, m.balance, 0}
end
local acc = open(account_key)
sweep(acc, holds_key)
local delta = settle_to(acc, m, actual, request_id, ARGV[10] == '1', budgets_key)
commit(account_key, calls_key, acc, true)
write_holds(holds_key, acc)
write_marker(marker_key, m)
return {OK, balance(acc), delta}
