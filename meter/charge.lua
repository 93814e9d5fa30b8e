-- KEYS: account, request marker, call log, holds, the request's kept
-- response (the marker again for a call without a binding). ARGV[8] feature, ARGV[9] cost, ARGV[10] 1 for overdraft,
-- ARGV[11] overdraft limit (-1: none), ARGV[12] request id, ARGV[13] marker
-- lifetime in seconds, ARGV[14] attempt id, ARGV[15] the call's binding
-- ('-' for none), ARGV[16] how long, in seconds, a call with a binding may
-- stay in flight before its key is free again.
--
-- A charge is a hold captured at once: it takes its cost of the available
-- balance (what no hold keeps), and its marker records which parts came from
-- allowance, purchased credits and debt, so that a refund gives each back to
-- where it came from.
--
-- Returns {code, balance, charged, kept}: code OK charged (or this attempt's
-- own charge, run before and repeated after a lost reply), REFUSED (nothing
-- written, not even for an org Redis has never seen), REPEAT an earlier call
-- with this request id completed (its balance and cost; kept is its kept
-- response, or false when it was too large to keep), IN_FLIGHT an earlier
-- call with this request id and a binding has not completed (charged, or
-- settled and its response not yet kept), MISMATCH the earlier call's
-- binding differs, VOIDED this attempt was voided (nothing charged). A
-- request refunded in full, refused, or voided by another attempt, is free to
-- charge again.
-- Of the keys, only the events list is written to after another key, and
-- only it could stop the script halfway; the others fail their first read,
-- before any write. Checking it alone keeps the hot path short.
local bad = check_types({[3] = 'list'})
if bad then return bad end
local account_key, marker_key, events_key, holds_key, kept_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local feature = ARGV[8]
local cost = tonumber(ARGV[9])
local overdraft = ARGV[10] == '1'
local limit = tonumber(ARGV[11])
local request_id = ARGV[12]
local marker_ttl = ARGV[13]
local attempt = ARGV[14]
local bind = ARGV[15]
local in_flight_ttl = ARGV[16]

local m = parse_marker(redis.call('GET', marker_key))
if m and m.attempt == attempt then
  if m.state == 'x' then return {VOIDED, 0, 0} end
  return {OK, m.balance, m.cost}
end
if m and not marker_free(m) then
  if m.bind ~= bind then
    return {MISMATCH, m.balance, 0}
  end
  if (m.state == 'c' or m.state == 'u') and bind ~= '-' then
    return {IN_FLIGHT, m.balance, 0}
  end
  if m.relied ~= '1' then
    m.relied = '1'
    write_marker(marker_key, m)
  end
  local kept = false
  if bind ~= '-' then kept = redis.call('GET', kept_key) end
  return {REPEAT, m.balance, m.cost, kept}
end

local acc = load(account_key)
local fresh = not acc
if fresh then
  acc = new_account(def_allowance, def_month)
end
sweep(acc, holds_key)
local free = available(acc)
if (not overdraft and free < cost) or (overdraft and limit >= 0 and free - cost < -limit) then
  return {REFUSED, balance(acc), 0}
end

if fresh then
  event(acc, 'grant', acc.rem, '', 'default-plan')
end
local p = take(acc, cost)
add_used(acc, feature, cost)
event(acc, 'charge', -cost, feature, request_id)
commit(account_key, events_key, acc, true)
write_holds(holds_key, acc)
local ttl = marker_ttl
if bind ~= '-' then ttl = in_flight_ttl end
write_marker(marker_key, {cost = cost, feature = feature, fa = p.fa, fp = p.fp, fd = p.fd,
  balance = balance(acc), state = 'c', pn = acc.pn, attempt = attempt, relied = '0', bind = bind}, ttl)
return {OK, balance(acc), cost}
