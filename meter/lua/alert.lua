-- KEYS: account, alerts. ARGV[8] the thresholds, space-separated, ARGV[9]
-- the time of the check (RFC 3339), ARGV[10] the org.
--
-- Finds the balance alerts that are due and records them as pending in the
-- org's alerts hash, in the same script, so that of any number of
-- gateways checking at once one records each alert: balance.below for
-- each threshold the balance is now below and was not below at the last
-- check, balance.exhausted when the balance reached zero since. The hash
-- holds l (the balance at the last check; a top-up or an adjustment that
-- adds credits raises it to the new balance, which re-arms the thresholds
-- below that), pn (the
-- period of the last check: a new period re-arms them all), n (the alerts
-- recorded so far) and p:<id> (each pending alert's body, until a gateway
-- delivered it) with c:<id> (when a gateway last took it on, Redis ms).
-- Nothing is written for an org Redis does not hold.
-- Returns {code, id, body, id, body...}.

--#include lib/account.lua

local bad = check_types({'hash', 'hash'})
if bad then return bad end
local account_key, alerts_key = KEYS[1], KEYS[2]
local at, org = ARGV[9], ARGV[10]

local acc = load(account_key)
if not acc then return {OK} end
local b = balance(acc)
local st = redis.call('HMGET', alerts_key, 'l', 'pn', 'n')
local last, n = tonumber(st[1]), tonumber(st[3] or 0)
if not last or tonumber(st[2]) ~= acc.pn then last = math.huge end

local out = {OK}
local function fire(kind, threshold)
  n = n + 1
  local id = org .. ':' .. str(now_ms) .. ':' .. str(n)
  local body = '{"id":"' .. id .. '","type":"' .. kind .. '","org":"' .. org .. '","threshold":' .. str(threshold) ..
    ',"balance":' .. str(b) .. ',"at":"' .. at .. '"}'
  redis.call('HSET', alerts_key, 'p:' .. id, body, 'c:' .. id, str(srv_now()))
  table.insert(out, id)
  table.insert(out, body)
end
for t in string.gmatch(ARGV[8], '%S+') do
  t = tonumber(t)
  if b < t and t <= last then fire('balance.below', t) end
end
if b <= 0 and last > 0 then fire('balance.exhausted', 0) end
if last ~= b or tonumber(st[2]) ~= acc.pn then
  redis.call('HSET', alerts_key, 'l', str(b), 'pn', str(acc.pn), 'n', str(n))
end
return out
