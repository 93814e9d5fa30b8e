-- A call's charge: charge.lua's, and each of a batch's in charges.lua.

--#include lib/quick.lua

-- The full way is built by the first charge of the run that needs it: a
-- script builds every function its top level defines at each run, and
-- building the full way's (the account, grants, holds, budgets) costs Redis
-- more than a quick charge does.
local full
local function charge(k, a)
  local r, c = charge_start(k, a)
  if r then return r end
  if not full then
    full = (function()
--#include lib/calls.lua
      return charge_full
    end)()
  end
  return full(c)
end
