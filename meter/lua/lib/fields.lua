-- The account's fields a charge reads and writes on its quick way
-- (lib/quick.lua) as on its full one (lib/account.lua, which describes
-- them all).

--#include lib/base.lua

-- What a charge reads of the account's fields that change with each charge
-- (the hot ones; account.lua reads the cold ones only when a script first
-- uses one): then gl.
local HOT = {'rem', 'pur', 'nx', 'pn', 'seq', 'ha', 'ho', 'hp', 'hx'}
local READ = {unpack(HOT)}
READ[#READ + 1] = 'gl'

-- Whether an account field is a day's usage: <yyyymmdd>:<feature>.
local function is_day(f)
  local c = string.byte(f, 1)
  return c ~= nil and c >= 48 and c <= 57
end

-- Drops the usage of days older than the 13 months kept.
local function prune_days(key)
  local from = days_kept_from()
  local old = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if is_day(f) and string.sub(f, 1, 8) < from then
      table.insert(old, f)
    end
  end
  if #old > 0 then redis.call('HDEL', key, unpack(old)) end
end
