-- Images of the account, kept so that a write of the gateway's own
-- reference can be undone while nothing else changed it.

--#include lib/account.lua
--#include lib/holds.lua

-- The account hash at key as a list of its fields and values, in the
-- order of the fields' names: two images are equal when the hashes are.
local function account_image(key)
  local raw = redis.call('HGETALL', key)
  local names, values = {}, {}
  for i = 1, #raw, 2 do
    names[#names + 1] = raw[i]
    values[raw[i]] = raw[i + 1]
  end
  table.sort(names)
  local out = {}
  for _, f in ipairs(names) do
    out[#out + 1] = f
    out[#out + 1] = values[f]
  end
  return out
end

-- A write the gateway may have to void (a plan or a recharge of a reference
-- of its own, whose outcome it could not learn) first writes what loading
-- the account changed (a recharge due, an expired hold), so that the image
-- of the account it keeps is the account as the write found it. Returns
-- the account, loaded again, and that image.
local function image_before(account_key, events_key, holds_key, acc)
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
  acc = load(account_key, true)
  return acc, account_image(account_key)
end

-- Keeps the account's images before and after a write at key, for ms
-- milliseconds: its void puts the first back while the account is still
-- the second.
local function keep_images(key, account_key, before, ms)
  redis.call('SET', key, cjson.encode({before, account_image(account_key)}), 'PX', ms)
end
