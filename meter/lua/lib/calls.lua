-- A call's charge, and its settle or refund.

--#include lib/account.lua
--#include lib/marker.lua
--#include lib/holds.lua
--#include lib/budgets.lua

-- Sets the period of a marker of the earlier layout: this one if it started
-- when the marker's did.
local function marker_period(m, acc)
  if m.legacy_ps then
    need_cold(acc)
    if m.legacy_ps == acc.ps then m.pn = acc.pn else m.pn = -1 end
    m.legacy_ps = nil
  end
end

-- Sets a charged request's final cost: refunded (the call failed; its id is
-- free again) or settled to its usage. Returns the change to the balance.
local function settle_to(acc, m, actual, ref, refund, budgets_key)
  marker_period(m, acc)
  local before = balance(acc)
  local diff = actual - m.cost
  local same_period = m.pn == acc.pn
  if diff > 0 then
    if not same_period then
      -- The marker keeps one period: the allowance it took of an ended
      -- one is not given back, so it is dropped before this period's.
      m.fa, m.pn = 0, acc.pn
    end
    add_parts(m, take(acc, diff))
  elseif diff < 0 then
    give_back(acc, m, -diff)
  end
  -- Usage of a period that has ended stays with that period; the day's
  -- usage is the charge's day's, whatever the period.
  if diff ~= 0 and same_period then
    add_used(acc, m.feature, diff, m.day)
  elseif diff ~= 0 then
    add_day(acc, m.feature, diff, m.day)
  end
  if diff ~= 0 and m.b then
    local subject, wid = string.match(m.b, '^(%S+):(%w+)$')
    if not subject then error('corrupt request marker') end
    budget_settle(budgets_key, subject, wid, diff)
  end
  if diff ~= 0 then
    local kind = 'settle'
    if refund then kind = 'refund' end
    event(acc, kind, balance(acc) - before, m.feature, ref)
  end
  m.cost, m.balance = actual, balance(acc)
  if refund then m.state = REFUNDED else m.state = SETTLED end
  return balance(acc) - before
end

-- A call's charge, its full way: charge_start (lib/quick.lua) ran first,
-- checked its request marker, found the charge not quick, and returned it
-- as read (c).
local function charge_full(c)
  local account_key, marker_key, calls_key, holds_key, budgets_key = c.account_key, c.marker_key, c.calls_key,
    c.holds_key, c.budgets_key
  local feature, cost, overdraft, limit, request_id = c.feature, c.cost, c.overdraft, c.limit, c.request_id
  local attempt, bind, subject, ttl, read = c.attempt, c.bind, c.subject, c.ttl, c.read

  local acc = load(account_key, false, feature, read)
  local fresh = not acc
  if fresh then
    acc = new_account(def_allowance, def_month)
  end
  sweep(acc, holds_key)
  local free = available(acc)
  if (not overdraft and free < cost) or (overdraft and limit >= 0 and free - cost < -limit) then
    return {REFUSED, balance(acc), 0}
  end
  -- The subject's budget, when the route names one and the org set one or
  -- a default: on block and notice routes it must pay the whole cost.
  local b = nil
  if subject ~= '-' then
    b = load_budget(budgets_key, subject, acc, holds_key)
    if b and not overdraft and budget_left(b) < cost then
      return {BUDGET, balance(acc), 0, false, b.limit, b.spent, window_end(b.window, acc)}
    end
  end

  if fresh then
    event(acc, 'grant', acc.rem, '', 'default-plan')
  end
  local p = take(acc, cost)
  add_used(acc, feature, cost)
  event(acc, 'charge', -cost, feature, request_id)
  local bad = commit(account_key, calls_key, acc, true)
  if bad then return {WRONG_TYPE, 3, bad} end
  if acc.swept then write_holds(holds_key, acc) end
  local mb = nil
  if b then
    b.spent = b.spent + cost
    write_spent(b)
    mb = subject .. ':' .. b.wid
  end
  write_marker(marker_key, {cost = cost, feature = feature, fa = p.fa, fp = p.fp, fd = p.fd, g = p.g,
    balance = balance(acc), state = CHARGED, pn = acc.pn, attempt = attempt, relied = '0', bind = bind, b = mb}, ttl)
  if b then
    return {OK, balance(acc), cost, false, b.limit, b.spent, window_end(b.window, acc)}
  end
  return {OK, balance(acc), cost}
end
