-- KEYS: account, top-up references, events, holds, alerts, grant
-- references. ARGV[8] amount, ARGV[9] reference, ARGV[10] the most
-- purchased credits an org may hold, ARGV[11] how long a reference is kept,
-- in ms, ARGV[12] when the credits expire, Redis ms (0: never: they add to
-- the standing purchased grant), ARGV[13] the most grants an org may have
-- live or pending, ARGV[14] who made it ('' for none).
--
-- Returns {code, account...}: code OK applied, REPEAT the reference was
-- applied before (nothing written), LIMIT the top-up would pass the limit,
-- ENDED expires is not after now, FULL the org has as many grants as it
-- may (nothing written for these three).

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/alerts.lua
--#include lib/by.lua

local bad = check_types({'hash', {'zset', 'set'}, 'list', 'hash', 'hash', 'hash'})
if bad then return bad end
local account_key, refs_key, events_key, holds_key, alerts_key, grefs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local amount = tonumber(ARGV[8])
local ref = ARGV[9]
local max_purchased = tonumber(ARGV[10])
local ref_kept = tonumber(ARGV[11])
local expires = tonumber(ARGV[12])
local max_grants = tonumber(ARGV[13])
local by = ARGV[14]

if ref_seen(refs_key, ref) then
  local acc = load(account_key, true) or new_account(def_allowance, def_month)
  return reply(acc, {REPEAT})
end
local acc = open(account_key, true)
sweep(acc, holds_key)
if acc.pur + acc.hp + amount > max_purchased then
  return reply(acc, {LIMIT})
end
if expires > 0 then
  if expires <= srv_now() then
    return reply(acc, {ENDED})
  end
  if open_grants(acc) >= max_grants then
    return reply(acc, {FULL})
  end
  local g = new_grant(acc, PURCHASED, amount, DEFAULT_PRIORITY, srv_now(), expires, ref)
  g.rem = repay(acc, amount)
  add_grant(acc, g)
  write_grant_ref(grefs_key, g)
else
  acc.pur = acc.pur + repay(acc, amount)
end
event(acc, 'topup', amount, '', ref)
sign(acc, 'topup', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc)
rearm_alerts(alerts_key, acc)
remember_ref(refs_key, ref, ref_kept)
return reply(acc, {OK})
