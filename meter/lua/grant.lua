-- KEYS: account, references, events, holds, alerts, grant references.
-- ARGV[8] amount, ARGV[9] kind (o: promotional), ARGV[10] priority
-- (0..100), ARGV[11] effective, Redis ms (0: now), ARGV[12] expires, Redis
-- ms (0: never), ARGV[13] reference ('-': none), ARGV[14] reason ('' for
-- none), ARGV[15] the most grants an org may have live or pending, ARGV[16]
-- who made it ('' for none).
--
-- Grants an extra grant: live at once when effective has come (it repays
-- debt first), pending until then. A reference is applied once per org: a
-- repeat answers the grant it made, while it is listed (live, pending, or
-- ended less than 90 days ago).
-- Returns {code, id, grant (grant_view), account...}: OK granted, REPEAT
-- the reference made a grant before (id and grant are that grant's; ''
-- when it was voided before it arrived), ENDED expires is not after now and after effective, FULL
-- the org has as many grants live or pending as it may (nothing written).

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/alerts.lua
--#include lib/by.lua

local bad = check_types({'hash', {'zset', 'set'}, 'list', 'hash', 'hash', 'hash'})
if bad then return bad end
local account_key, refs_key, events_key, holds_key, alerts_key, grefs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local amount = tonumber(ARGV[8])
local kind = ARGV[9]
local priority = tonumber(ARGV[10])
local effective = tonumber(ARGV[11])
local expires = tonumber(ARGV[12])
local ref = ARGV[13]
local reason = ARGV[14]
local max_grants = tonumber(ARGV[15])
local by = ARGV[16]
local seen_ref = '\0grant:' .. ref

local acc = load(account_key, true)
-- A repeat finds the grant its reference made in the grant references
-- (kept while the grant is listed); a grant of the gateway's own reference
-- voided before it arrived finds its reference marked in the references.
if ref ~= '-' then
  local g = acc and grant_by_ref(acc, grefs_key, ref)
  if g then return reply(acc, {REPEAT, g.id, grant_view(g)}) end
  if ref_seen(refs_key, seen_ref) then
    return reply(acc or new_account(def_allowance, def_month), {REPEAT, '', ''})
  end
end
if effective == 0 then effective = srv_now() end
if expires > 0 and (expires <= srv_now() or expires <= effective) then
  return {ENDED}
end
local fresh = not acc
if fresh then
  acc = new_account(def_allowance, def_month)
end
sweep(acc, holds_key)
if open_grants(acc) >= max_grants then
  return reply(acc, {FULL, '', ''})
end
if fresh then
  event(acc, 'grant', acc.rem, '', 'default-plan')
end
if reason == '' then reason = nil end
local g = grant(acc, new_grant(acc, kind, amount, priority, effective, expires, ref, reason))
sign(acc, 'grant', by)
commit(account_key, events_key, acc)
write_grant_ref(grefs_key, g)
write_holds(holds_key, acc)
rearm_alerts(alerts_key, acc)
return reply(acc, {OK, g.id, grant_view(g)})
