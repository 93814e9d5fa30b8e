-- KEYS: account, events, holds, references, the write's images. ARGV[8]
-- allowance, ARGV[9] recharge month, ARGV[10] reference, ARGV[11] how long
-- a reference is kept, in ms, ARGV[12] how long the images are kept, in ms
-- (0: none are kept), ARGV[13] rollover (0..allowance), ARGV[14] who made
-- it ('' for none).
--
-- An org without a plan of its own starts a new period on this plan at once;
-- a change to an org's own plan waits for the next recharge. A reference is
-- applied once per org; plans' references are apart from other writes'.
-- With images, the account as the plan found it and as it left it are kept,
-- so that voidwrite.lua can undo it.
-- Returns {code, account...}: OK applied, REPEAT the reference was applied
-- before (nothing written).

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/images.lua
--#include lib/by.lua

local bad = check_types({'hash', 'list', 'hash', {'zset', 'set'}, 'string'})
if bad then return bad end
local account_key, events_key, holds_key, refs_key, images_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local allowance = tonumber(ARGV[8])
local month = tonumber(ARGV[9])
local ref = '\0plan:' .. ARGV[10]
local ref_kept = tonumber(ARGV[11])
local images_kept = tonumber(ARGV[12])
local rollover = tonumber(ARGV[13])
local by = ARGV[14]
local name = str(allowance) .. '/' .. str(month)
if rollover > 0 then name = name .. '/' .. str(rollover) end

if ref_seen(refs_key, ref) then
  local acc = load(account_key, true) or new_account(def_allowance, def_month)
  return reply(acc, {REPEAT})
end
local acc = load(account_key, true)
local before
if images_kept > 0 then
  -- A new org's image is empty: its void leaves the org on the default
  -- plan.
  before = {}
  if acc then
    sweep(acc, holds_key)
    acc, before = image_before(account_key, events_key, holds_key, acc)
  end
end
if not acc then
  acc = new_account(allowance, month)
  acc.own = 1
  start_period(acc, math.floor(now_ms / 1000))
  acc.ro = rollover
  event(acc, 'plan', balance(acc), '', name)
else
  sweep(acc, holds_key)
  need_gs(acc)
  if acc.own ~= 1 then
    local before_balance = balance(acc)
    acc.a, acc.m, acc.own = allowance, month, 1
    start_period(acc, math.floor(now_ms / 1000))
    acc.ro = rollover
    event(acc, 'plan', balance(acc) - before_balance, '', name)
  elseif acc.a == allowance and acc.m == month and acc.ro == rollover then
    if acc.pa then
      acc.pa, acc.pm, acc.pr = nil, nil, nil
      event(acc, 'plan', 0, '', name)
    end
  elseif acc.pa ~= allowance or acc.pm ~= month or acc.pr ~= rollover then
    acc.pa, acc.pm, acc.pr = allowance, month, rollover
    event(acc, 'plan', 0, '', name)
  end
end
sign(acc, 'plan', by)
commit(account_key, events_key, acc)
write_holds(holds_key, acc)
if before then keep_images(images_key, account_key, before, images_kept) end
remember_ref(refs_key, ref, ref_kept)
return reply(acc, {OK})
