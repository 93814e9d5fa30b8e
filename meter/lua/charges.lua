-- Charges of different orgs, one after another in one run, as each would
-- run alone (charge.lua): on a single Redis, where a script may touch keys
-- of many orgs. KEYS: five per charge, as charge.lua's; ARGV[8..]: nine per
-- charge, as charge.lua's ARGV[8..16].
--
-- Returns one reply per charge, as charge.lua's. A charge whose script
-- raised an error (a corrupt account, say) stopped before it wrote
-- anything, as a charge alone does; its reply is {-1, the error}, and the
-- charges after it run.

--#include lib/calls.lua

local out = {}
for i = 0, (#ARGV - 7) / 9 - 1 do
  local ok, r = pcall(charge, i * 5, 7 + i * 9)
  if not ok then
    if type(r) == 'table' and r.err then r = r.err end
    r = {-1, tostring(r)}
  end
  out[i + 1] = r
end
return out
