-- Charges of different orgs, one after another in one run, as each would
-- run alone (charge.lua): on a single Redis, where a script may touch keys
-- of many orgs. KEYS: six per charge, as charge.lua's; ARGV[8..]: ten per
-- charge, as charge.lua's ARGV[8..17].
--
-- Returns one reply per charge, as charge.lua's. A charge whose script
-- raised an error (a corrupt account, say) stopped before it wrote
-- anything, as a charge alone does; its reply is {-1, the error}, and the
-- charges after it run.

--#include lib/charge.lua

local out = {}
for i = 0, (#ARGV - 7) / 10 - 1 do
  local ok, r = pcall(charge, i * 6, 7 + i * 10)
  if not ok then
    if type(r) == 'table' and r.err then r = r.err end
    r = {-1, tostring(r)}
  end
  out[i + 1] = r
end
return out
