-- KEYS: account, events, holds, references, the write's images. ARGV[8]
-- reference, ARGV[9] how long a reference is kept, in ms, ARGV[10] how long
-- the images are kept, in ms (0: none are kept), ARGV[11] who made it (''
-- for none).
--
-- Starts a new period now, on the plan waiting for it if there is one. A
-- reference is applied once per org, so a recharge sent again after a lost
-- reply changes nothing; recharges' references are apart from other
-- writes'. With images, the account as the recharge found it and as it
-- left it are kept, so that voidwrite.lua can undo it.
-- Returns {code, account...}: OK applied, REPEAT the reference was applied
-- before (nothing written but what fell due).

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/images.lua
--#include lib/by.lua

local bad = check_types({'hash', 'list', 'hash', {'zset', 'set'}, 'string'})
if bad then return bad end
local account_key, events_key, holds_key, refs_key, images_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ref = '\0recharge:' .. ARGV[8]
local ref_kept = tonumber(ARGV[9])
local images_kept = tonumber(ARGV[10])
local by = ARGV[11]

local acc = open(account_key, true)
sweep(acc, holds_key)
if ref_seen(refs_key, ref) then
  if #acc.events > 0 then
    commit(account_key, events_key, acc)
    write_holds(holds_key, acc)
  end
  return reply(acc, {REPEAT})
end
local before
if images_kept > 0 then
  acc, before = image_before(account_key, events_key, holds_key, acc)
end
local before_balance = balance(acc)
start_period(acc, math.floor(now_ms / 1000))
event(acc, 'recharge', balance(acc) - before_balance, '', 'manual')
sign(acc, 'recharge', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc)
if before then keep_images(images_key, account_key, before, images_kept) end
remember_ref(refs_key, ref, ref_kept)
return reply(acc, {OK})
