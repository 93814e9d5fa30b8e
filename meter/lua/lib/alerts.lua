-- Balance alerts, armed again when the balance rises.

--#include lib/account.lua

-- The balance rose: the balance alerts below it are armed again. The
-- balance of the org's last alert check (alert.lua) is raised to it, never
-- lowered, so a fall that no check has seen yet is still alerted.
local function rearm_alerts(key, acc)
  if redis.call('EXISTS', key) == 0 then return end
  local last = tonumber(redis.call('HGET', key, 'l'))
  if not last or last < balance(acc) then
    redis.call('HSET', key, 'l', str(balance(acc)))
  end
end
