-- Budgets: spending limits below the org, one per subject (a user, an API
-- key, a team: whatever the route's budget placeholder yields).
--
-- The org's budgets key is a hash: d is the default budget, for subjects
-- with none of their own, and l:<subject> a subject's own, each "limit
-- window"; s:<subject> is what the subject spent, "<window> <spent>",
-- where window names the window it was spent in (window_id). A subject
-- with neither a budget nor the default has no field, and a charge reads
-- the hash only when its route has a budget. The org's budget index (a
-- sorted set of the subjects with a budget of their own) pages them in
-- order.
--
-- r:<subject> is the shares of the subject's budget that leases hold,
-- "<window> <lease>=<credits> ...": a gateway pays a subject's calls from
-- its share without a store call. A share counts against the budget while
-- its lease's hold keeps credits (live, or unreported: by the same rules
-- and bound), and only in the window it was given in; what its lease
-- reports spent moves from the share to s:<subject>.

--#include lib/holds.lua

-- Windows: d a UTC day, w a week from Monday 00:00 UTC, m a calendar month
-- in UTC, p the org's credit period.
local BUDGET_WINDOWS = {d = true, w = true, m = true, p = true}

-- The window of kind w that now falls in, as its spending records it:
-- d20261206, w20261130 (its Monday), m202612, p<period number>.
local function window_id(w, acc)
  if w == 'd' then return 'd' .. today() end
  if w == 'w' then
    local d = math.floor(now_ms / 86400000)
    -- 1970-01-01 was a Thursday: (d + 3) % 7 days have passed since Monday.
    return 'w' .. ymd(d - (d + 3) % 7)
  end
  if w == 'm' then return 'm' .. string.sub(today(), 1, 6) end
  return 'p' .. str(acc.pn)
end

-- When the window of kind w that now falls in ends, unix ms.
local function window_end(w, acc)
  local d = math.floor(now_ms / 86400000)
  if w == 'd' then return (d + 1) * 86400000 end
  if w == 'w' then return (d - (d + 3) % 7 + 7) * 86400000 end
  if w == 'm' then return ym_unix(now_ym + 1) * 1000 end
  return ym_unix(acc.nx) * 1000
end

local function parse_limit(s)
  local limit, w = string.match(s, '^(%d+) (%a)$')
  if not limit or not BUDGET_WINDOWS[w] then error('corrupt budget') end
  return tonumber(limit), w
end

local function parse_spent(s)
  local wid, spent = string.match(s, '^(%w+) (%d+)$')
  if not wid then error('corrupt budget spending') end
  return wid, tonumber(spent)
end

-- The budget of subject in the budgets hash at key, as it stands in the
-- window now: its own, else the default; nil when there is neither. own is
-- the subject's own limit field as read (false: none), def the default's.
local function budget_of(key, subject, acc, own, def, spending)
  local lim = own or def
  if not lim then return nil end
  local b = {key = key, subject = subject, own = own and true or false, spent = 0}
  b.limit, b.window = parse_limit(lim)
  b.wid = window_id(b.window, acc)
  if spending then
    local wid, spent = parse_spent(spending)
    if wid == b.wid then b.spent = spent end
  end
  return b
end

-- The shares in r:<subject> as read (s, or nil), of window wid alone: a
-- window's end voids them. Returns lease id -> credits.
local function parse_shares(s, wid)
  local out = {}
  if not s then return out end
  local w, rest = string.match(s, '^(%w+)(.*)$')
  if w ~= wid then return out end
  for id, n in string.gmatch(rest, ' (%S+)=(%d+)') do out[id] = tonumber(n) end
  return out
end

-- Drops the shares whose lease's hold keeps no credits (it ended, was
-- released or expired), and returns what the others reserve.
local function live_shares(shares, acc, holds_key)
  local total = 0
  for id, n in pairs(shares) do
    local h = get_hold(acc, holds_key, id)
    if h and keeps(h) then
      total = total + n
    else
      shares[id] = nil
    end
  end
  return total
end

-- Reads subject's budget (one HMGET); nil when it has none. With holds_key,
-- it also reads the shares leases hold of it (b.shares, b.reserved).
local function load_budget(key, subject, acc, holds_key)
  local raw = redis.call('HMGET', key, 'l:' .. subject, 'd', 's:' .. subject, 'r:' .. subject)
  local b = budget_of(key, subject, acc, raw[1], raw[2], raw[3])
  if b then
    b.shares, b.reserved = {}, 0
    if holds_key and raw[4] then
      b.shares = parse_shares(raw[4], b.wid)
      b.reserved = live_shares(b.shares, acc, holds_key)
    end
  end
  return b, raw[4]
end

-- What the budget has left in its window for a call paid by the store,
-- never below 0: leases' shares are set aside for their calls.
local function budget_left(b)
  return math.max(b.limit - b.spent - (b.reserved or 0), 0)
end

-- Writes the budget's shares, unless they read raw already: none drops the
-- field.
local function write_shares(b, raw)
  local ids = {}
  for id, n in pairs(b.shares) do
    if n > 0 then ids[#ids + 1] = id end
  end
  if #ids == 0 then
    if raw then redis.call('HDEL', b.key, 'r:' .. b.subject) end
    return
  end
  table.sort(ids)
  local parts = {b.wid}
  for _, id in ipairs(ids) do parts[#parts + 1] = id .. '=' .. str(b.shares[id]) end
  local s = table.concat(parts, ' ')
  if s ~= raw then redis.call('HSET', b.key, 'r:' .. b.subject, s) end
end

-- Writes the budget's spending in its window.
local function write_spent(b)
  redis.call('HSET', b.key, 's:' .. b.subject, b.wid .. ' ' .. str(b.spent))
end

-- Counts n more credits (fewer when n < 0, never below 0) against the
-- subject's spending in window wid, as a settle or refund of a call charged
-- in that window does: a window that has ended is not changed.
local function budget_settle(key, subject, wid, n)
  if n == 0 then return end
  local f = 's:' .. subject
  local s = redis.call('HGET', key, f)
  if not s then return end
  local cur, spent = parse_spent(s)
  if cur ~= wid then return end
  redis.call('HSET', key, f, wid .. ' ' .. str(math.max(spent + n, 0)))
end

-- A budget as the admin API reads it: {subject, limit, window, spent,
-- resets (unix ms), own (1: the subject's own, 0: the default)}.
local function budget_view(b, acc)
  local own = 0
  if b.own then own = 1 end
  return {b.subject, b.limit, b.window, b.spent, window_end(b.window, acc), own}
end
