-- KEYS: account, top-up references, events, holds, grant references.
-- ARGV[8] amount, ARGV[9] reference, ARGV[10] how long a reference is
-- kept, in ms.
--
-- Makes sure a top-up whose outcome the gateway could not learn (it
-- answered 503) does not stand: one that ran is taken back, as a charge
-- takes credits (purchased first, here: they are what it added); one still
-- on its way finds its reference applied and adds nothing. The reference's
-- void is recorded too, so that a void sent again changes nothing. Only for
-- references no client can send again (the gateway's own random ones).
-- Returns {code, account...}: OK done, REPEAT voided before.

--#include lib/holds.lua
--#include lib/refs.lua

local bad = check_types({'hash', {'zset', 'set'}, 'list', 'hash', 'hash'})
if bad then return bad end
local account_key, refs_key, events_key, holds_key, grefs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local amount = tonumber(ARGV[8])
local ref = ARGV[9]
local ref_kept = tonumber(ARGV[10])
local void_ref = '\0void:' .. ref

local acc = load(account_key, true)
if ref_seen(refs_key, void_ref) then
  return reply(acc or new_account(def_allowance, def_month), {REPEAT})
end
local applied = ref_seen(refs_key, ref)
if applied and acc then
  sweep(acc, holds_key)
  local before = balance(acc)
  local g = grant_by_ref(acc, grefs_key, ref)
  if g and g.kind == PURCHASED then
    -- A top-up with an expiry made a grant of its own: it is voided, and
    -- what of it was spent or repaid debt is taken again, into debt if it
    -- must, so that the balance loses the top-up's amount.
    local lost = 0
    if grant_live(g) then lost = end_grant(acc, g, GRANT_VOIDED, srv_now()) end
    acc.rem = acc.rem - (amount - lost)
  else
    local from_purchased = math.min(amount, math.max(acc.pur, 0))
    acc.pur = acc.pur - from_purchased
    acc.rem = acc.rem - (amount - from_purchased)
  end
  event(acc, 'void', balance(acc) - before, '', ref)
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
end
local forget = str(srv_now() + ref_kept)
refs_move(refs_key, forget)
redis.call('ZADD', refs_key, forget, ref, forget, void_ref)
redis.call('PEXPIRE', refs_key, ref_kept)
return reply(acc or new_account(def_allowance, def_month), {OK})
