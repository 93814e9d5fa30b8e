-- Returns {0, account...}, or {3} when Redis holds nothing for the org. A
-- recharge that fell due is written, as any operation would.
local acc = load(KEYS[1])
if not acc then
  return {3}
end
if #acc.events > 0 then
  commit(KEYS[1], KEYS[2], acc)
end
return reply(acc, {0})
