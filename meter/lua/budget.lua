-- KEYS: account, budgets, budget index. ARGV[8] 'set' or 'del', ARGV[9]
-- the subject ('-' for the org's default budget), ARGV[10] the limit and
-- ARGV[11] the window (d, w, m or p) of a set.
--
-- Sets or removes a subject's budget, or the org's default. A new limit
-- keeps what the subject spent in the window that now runs (lowered below
-- it, the budget has nothing left until the window ends). Removing a
-- subject's own budget keeps its spending only while the default counts
-- it; removing the default drops the spending of every subject it counted.
-- Leases' shares of a budget that is gone go with it (their leases learn it
-- at their next sync); a changed limit changes them at their next sync.
--
-- Returns {OK, budget view} (lib/budgets.lua's budget_view): of the budget
-- as set, or as it was before its removal; {NOT_FOUND} when there was
-- nothing to remove.

--#include lib/budgets.lua

local bad = check_types({'hash', 'hash', 'zset'})
if bad then return bad end
local account_key, budgets_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local op, subject = ARGV[8], ARGV[9]
local default = subject == '-'
local field = 'd'
if not default then field = 'l:' .. subject end

if op == 'set' then
  local w = ARGV[11]
  if not BUDGET_WINDOWS[w] then error('unknown budget window ' .. w) end
  redis.call('HSET', budgets_key, field, str(tonumber(ARGV[10])) .. ' ' .. w)
  if not default then redis.call('ZADD', index_key, 0, subject) end
  local acc = load(account_key) or new_account(def_allowance, def_month)
  local b
  if default then
    b = budget_of(budgets_key, '-', acc, false, redis.call('HGET', budgets_key, 'd'), nil)
  else
    b = load_budget(budgets_key, subject, acc)
  end
  return {OK, budget_view(b, acc)}
end

local raw = redis.call('HMGET', budgets_key, field, 'd', 's:' .. subject)
if not raw[1] then
  return {NOT_FOUND}
end
local acc = load(account_key) or new_account(def_allowance, def_month)
local view
if default then
  view = budget_view(budget_of(budgets_key, '-', acc, false, raw[1], nil), acc)
else
  view = budget_view(budget_of(budgets_key, subject, acc, raw[1], false, raw[3]), acc)
end
redis.call('HDEL', budgets_key, field)
if not default then
  redis.call('ZREM', index_key, subject)
  if not raw[2] then
    redis.call('HDEL', budgets_key, 's:' .. subject, 'r:' .. subject)
  end
  return {OK, view}
end
-- The default's subjects: those with spending and no budget of their own.
local fields = redis.call('HKEYS', budgets_key)
local own, gone = {}, {}
for _, f in ipairs(fields) do
  if string.sub(f, 1, 2) == 'l:' then own[string.sub(f, 3)] = true end
end
for _, f in ipairs(fields) do
  local k = string.sub(f, 1, 2)
  if (k == 's:' or k == 'r:') and not own[string.sub(f, 3)] then gone[#gone + 1] = f end
end
for i = 1, #gone, 1000 do
  redis.call('HDEL', budgets_key, unpack(gone, i, math.min(i + 999, #gone)))
end
return {OK, view}
