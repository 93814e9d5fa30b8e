-- KEYS: account, events, holds, references, the write's images. ARGV[8] the
-- write's kind, plan or recharge, ARGV[9] its reference, ARGV[10] how long a
-- reference is kept, in ms.
--
-- Makes sure a plan or a recharge whose outcome the gateway could not learn
-- (it answered 503) does not stand. One still on its way finds its
-- reference applied and changes nothing. One that ran is undone when the
-- account is still as it left it: the account as it found it is put back.
-- When something changed the account since (a call was charged in the new
-- period), no undo is exact: the write stands, and the void's event says
-- so. The void is recorded too, so that a void sent again changes nothing.
-- Only for references no client can send again (the gateway's own).
-- Returns {code, account...}: OK done (undone, or never applied), ENDED the
-- write ran and stands, REPEAT voided before.

--#include lib/holds.lua
--#include lib/refs.lua
--#include lib/images.lua

local bad = check_types({'hash', 'list', 'hash', {'zset', 'set'}, 'string'})
if bad then return bad end
local account_key, events_key, holds_key, refs_key, images_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local kind = ARGV[8]
local ref = '\0' .. kind .. ':' .. ARGV[9]
local ref_kept = tonumber(ARGV[10])
local void_ref = '\0void:' .. ref

if ref_seen(refs_key, void_ref) then
  return reply(load(account_key, true) or new_account(def_allowance, def_month), {REPEAT})
end
local code = OK
if ref_seen(refs_key, ref) then
  local images = redis.call('GET', images_key)
  local undo = false
  if images then
    images = cjson.decode(images)
    undo = cjson.encode(account_image(account_key)) == cjson.encode(images[2])
  end
  local acc = load(account_key, true)
  if acc and undo then
    local after = balance(acc)
    local seq = acc.seq
    redis.call('DEL', account_key)
    if #images[1] > 0 then
      redis.call('HSET', account_key, unpack(images[1]))
      -- Events keep their numbers: the sequence goes on from the write's.
      redis.call('HSET', account_key, 'seq', str(seq))
      acc = load(account_key, true)
      sweep(acc, holds_key)
    else
      -- The write made the account: the org is left on the default plan.
      acc = new_account(def_allowance, def_month)
      acc.seq = seq
    end
    event(acc, 'void', balance(acc) - after, '', ARGV[9], nil, 'the ' .. kind .. ' answered 503 is undone')
  elseif acc then
    sweep(acc, holds_key)
    event(acc, 'void', 0, '', ARGV[9], nil, 'the ' .. kind .. ' answered 503 had applied, and the account changed since: it stands')
    code = ENDED
  end
  if acc then
    commit(account_key, events_key, acc)
    write_holds(holds_key, acc)
  end
end
redis.call('DEL', images_key)
local forget = str(srv_now() + ref_kept)
refs_move(refs_key, forget)
redis.call('ZADD', refs_key, forget, ref, forget, void_ref)
redis.call('PEXPIRE', refs_key, ref_kept)
return reply(load(account_key, true) or new_account(def_allowance, def_month), {code})
