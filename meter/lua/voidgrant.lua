-- KEYS: account, events, holds, references, grant references. ARGV[8] grant
-- id ('' to find it
-- by its reference), ARGV[9] reason, ARGV[10] the grant's reference (''
-- when found by id), ARGV[11] how long a reference is kept, in ms, ARGV[12]
-- who voided it ('' for none).
--
-- Voids an extra grant: what remains of it is gone (event void); what live
-- holds took from it stays theirs. Found by its reference (a grant of the
-- gateway's own reference, whose outcome it could not learn), the
-- reference is also marked applied, so that a grant still on its way never
-- applies.
-- Returns {code, state, account...}: OK voided, REPEAT voided before
-- (nothing written), ENDED the grant had ended (spent or expired; state
-- says which), NOT_FOUND no such org or grant.

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/by.lua

local bad = check_types({'hash', 'list', 'hash', {'zset', 'set'}, 'hash'})
if bad then return bad end
local account_key, events_key, holds_key, refs_key, grefs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id = ARGV[8]
local reason = ARGV[9]
local ref = ARGV[10]
local ref_kept = tonumber(ARGV[11])
local by = ARGV[12]

local acc = load(account_key, true)
local g = nil
if ref ~= '' then
  if acc then g = grant_by_ref(acc, grefs_key, ref) end
  remember_ref(refs_key, '\0grant:' .. ref, ref_kept)
  if not g then return {NOT_FOUND} end
else
  if not acc then return {NOT_FOUND} end
  g = grant_of(acc, id)
  if not g then return {NOT_FOUND} end
  grant_refs(acc, grefs_key)
  local r = acc.grefs[g.id]
  if r then g.ref, g.reason = r[1], r[2] end
end
sweep(acc, holds_key)
local code = OK
if g.state == GRANT_VOIDED then
  code = REPEAT
elseif g.state ~= GRANT_LIVE and g.state ~= GRANT_PENDING then
  code = ENDED
else
  local lost = end_grant(acc, g, GRANT_VOIDED, srv_now())
  if reason ~= '' then g.reason = reason end
  event(acc, 'void', -lost, '', 'g' .. g.id, nil, reason)
  sign(acc, 'void', by)
  write_grant_ref(grefs_key, g)
end
if #acc.events > 0 or acc.gdirty then
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
end
return reply(acc, {code, g.state})
