-- KEYS: account, events, holds.
--
-- Returns {OK, account...}, or {NOT_FOUND} when Redis holds nothing for the
-- org. A recharge or an expiry that fell due is written, as any operation
-- would.

--#include lib/holds.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]

local acc = load(account_key, true)
if not acc then
  return {NOT_FOUND}
end
sweep(acc, holds_key)
if #acc.events > 0 then
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
end
return reply(acc, {OK})
