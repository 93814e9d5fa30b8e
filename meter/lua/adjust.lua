-- KEYS: account, references, events, holds, alerts. ARGV[8] amount (not 0),
-- ARGV[9] reference, ARGV[10] reason, ARGV[11] the most purchased credits
-- an org may hold, ARGV[12] how long a reference is kept, in ms, ARGV[13]
-- who made it ('' for none).
--
-- An operator's correction: a positive amount adds purchased credits, as a
-- top-up does; a negative one takes credits as a charge does (allowance
-- first, then purchased credits, then debt: the correction stands whatever
-- the balance). Its event carries the reason. A reference is applied once
-- per org; adjustments' references are apart from top-ups'.
-- Returns {code, account...}: code OK applied, REPEAT the reference was
-- applied before (nothing written), LIMIT the adjustment would pass the
-- purchased limit (nothing written).

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/alerts.lua
--#include lib/by.lua

local bad = check_types({'hash', {'zset', 'set'}, 'list', 'hash', 'hash'})
if bad then return bad end
local account_key, refs_key, events_key, holds_key, alerts_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local amount = tonumber(ARGV[8])
local ref = '\0adjust:' .. ARGV[9]
local reason = ARGV[10]
local max_purchased = tonumber(ARGV[11])
local ref_kept = tonumber(ARGV[12])
local by = ARGV[13]

if ref_seen(refs_key, ref) then
  local acc = load(account_key, true) or new_account(def_allowance, def_month)
  return reply(acc, {REPEAT})
end
local acc = open(account_key, true)
sweep(acc, holds_key)
if amount > 0 then
  if acc.pur + acc.hp + amount > max_purchased then
    return reply(acc, {LIMIT})
  end
  acc.pur = acc.pur + repay(acc, amount)
else
  take(acc, -amount)
end
event(acc, 'adjust', amount, '', ARGV[9], nil, reason)
sign(acc, 'adjust', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc)
if amount > 0 then rearm_alerts(alerts_key, acc) end
remember_ref(refs_key, ref, ref_kept)
return reply(acc, {OK})
