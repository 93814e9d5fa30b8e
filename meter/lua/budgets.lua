-- KEYS: account, budgets, budget index. ARGV[8] 'get' or 'list'; for get,
-- ARGV[9] the subject ('-' for the org's default); for list, ARGV[9] the
-- subject to list after ('-' from the first) and ARGV[10] the most
-- subjects to list.
--
-- Reads budgets as they stand in the window that now runs; writes nothing
-- (a recharge that fell due is seen, not written).
--
-- Returns for get {OK, budget view} (lib/budgets.lua's budget_view), or
-- {NOT_FOUND} when the subject has no budget (nor the org a default); for
-- list {OK, the default's view or false, {views of the subjects with a
-- budget of their own, in order}, the subject to list after next ('' when
-- none is left)}.

--#include lib/budgets.lua

local bad = check_types({'hash', 'hash', 'zset'})
if bad then return bad end
local account_key, budgets_key, index_key = KEYS[1], KEYS[2], KEYS[3]
local op, subject = ARGV[8], ARGV[9]
local acc = load(account_key) or new_account(def_allowance, def_month)

if op == 'get' then
  local b
  if subject == '-' then
    b = budget_of(budgets_key, '-', acc, false, redis.call('HGET', budgets_key, 'd'), nil)
  else
    b = load_budget(budgets_key, subject, acc)
  end
  if not b then return {NOT_FOUND} end
  return {OK, budget_view(b, acc)}
end

local n = tonumber(ARGV[10])
local from = '-'
if subject ~= '-' then from = '(' .. subject end
local subjects = redis.call('ZRANGEBYLEX', index_key, from, '+', 'limit', 0, n + 1)
local cursor = ''
if #subjects > n then
  subjects[n + 1] = nil
  cursor = subjects[n]
end
local views = {}
if #subjects > 0 then
  local fields = {}
  for _, s in ipairs(subjects) do
    fields[#fields + 1] = 'l:' .. s
    fields[#fields + 1] = 's:' .. s
  end
  local raw = redis.call('HMGET', budgets_key, unpack(fields))
  for i, s in ipairs(subjects) do
    local b = budget_of(budgets_key, s, acc, raw[2 * i - 1], false, raw[2 * i])
    if not b then error('budget index names ' .. s .. ', which has no budget') end
    views[#views + 1] = budget_view(b, acc)
  end
end
local def = false
local d = redis.call('HGET', budgets_key, 'd')
if d then def = budget_view(budget_of(budgets_key, '-', acc, false, d, nil), acc) end
return {OK, def, views, cursor}
