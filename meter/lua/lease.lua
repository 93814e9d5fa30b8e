-- KEYS: account, call log, holds, budgets. ARGV[8] lease id, ARGV[9] sync
-- number, ARGV[10] credits the lease wants to hold, ARGV[11] credits the
-- lease must leave free for others, ARGV[12] the lease's lifetime in ms,
-- ARGV[13] the credits the lease held unspent when it sent the sync (it may
-- spend them while the sync is on its way), ARGV[14] n, ARGV[15] m, ARGV[16]
-- k, then n pairs of feature and net credits spent since the last sync, then
-- m sextuples of feature, day (yyyymmdd, or empty: today), period number
-- (-1: this one), credits, subject ('' for none) and budget window:
-- corrections of calls an earlier sync reported (a refund below zero, usage
-- above the cost above), which count on the day, in the period and in the
-- budget window that sync charged them; then k quintuples of subject,
-- budget window ('' when the subject had no budget), credits its calls
-- spent since the last sync, the share of its budget the lease wants, and
-- the share it held unspent when it sent the sync.
--
-- A lease is a hold of the gateway's. The sync captures the spending it
-- reports from the hold (a refund of a reported call gives back what the
-- lease captured, to where it came from), then sets what the hold keeps:
-- what the lease wants, as far as the available balance allows, and never
-- less than what it held unspent, which it may be spending. Unless synced
-- within its lifetime, the hold becomes unreported by Redis' clock and keeps
-- its credits (see sweep). A sync number already applied changes nothing (a
-- repeat after a lost reply): the record stays, holding 0 once the lease
-- has ended, for a day.
--
-- The lease holds shares of its subjects' budgets alike (lib/budgets.lua):
-- a subject's spending moves from the lease's share to the window it was
-- spent in (none once that window has ended), and the share is set to what
-- the lease wants, at most half of what the budget has left beside the
-- other leases' shares (the rest is paid call by call, exactly), and never
-- less than what it held unspent, as far as the limit leaves it (a lowered
-- limit shrinks it). A lease that holds no credits holds no share.
-- Returns {code, held, balance, day, period, then per subject: share (-1:
-- the subject has no budget), window, ms until the window ends, limit,
-- spent}: OK applied, REPEAT a repeat (no shares); day and period are those
-- the sync's spending was charged on and in.

--#include lib/holds.lua
--#include lib/budgets.lua

local bad = check_types({'hash', 'list', 'hash', 'hash'})
if bad then return bad end
local account_key, calls_key, holds_key, budgets_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id = ARGV[8]
local seq = tonumber(ARGV[9])
local want = tonumber(ARGV[10])
local keep = tonumber(ARGV[11])
local ttl = tonumber(ARGV[12])
local unspent = tonumber(ARGV[13])
local pairs_end = 16 + 2 * tonumber(ARGV[14])
local late_end = pairs_end + 6 * tonumber(ARGV[15])
local subjects_end = late_end + 5 * tonumber(ARGV[16])

local spends = false
for i = 17, pairs_end, 2 do
  if tonumber(ARGV[i + 1]) ~= 0 then spends = true end
end
for i = pairs_end + 1, late_end, 6 do
  if tonumber(ARGV[i + 3]) ~= 0 then spends = true end
end
for i = late_end + 1, subjects_end, 5 do
  if tonumber(ARGV[i + 2]) ~= 0 then spends = true end
end

local acc = load(account_key)
if not acc then
  local fresh = new_account(def_allowance, def_month)
  if not spends and math.min(want, available(fresh) - keep) <= 0 then
    -- An org Redis has never seen, with nothing to report and too few
    -- credits to lease: nothing is written.
    return {OK, 0, balance(fresh), today(), 0}
  end
  acc = open(account_key)
end
sweep(acc, holds_key)
local h = get_hold(acc, holds_key, id)
if h and seq <= h.seq then
  local n = 0
  if keeps(h) then n = hold_amount(h) end
  return {REPEAT, n, balance(acc), today(), acc.pn}
end
-- Whether the lease's shares stand: its hold kept credits until now.
local had = h ~= nil and keeps(h)
h = h or new_hold(acc, 'lease')

-- Every budget the sync names is read, and found sound, before anything is
-- written: its limit, its spending, the lease's own share (which stands
-- only while its hold kept credits) and the other leases' live shares.
local subjects = {}
for i = late_end + 1, subjects_end, 5 do
  local b, raw = load_budget(budgets_key, ARGV[i], acc, false)
  local e = {b = b, raw = raw, mine = 0, others = 0}
  if b then
    b.shares = parse_shares(raw, b.wid)
    if had then e.mine = b.shares[id] or 0 end
    b.shares[id] = nil
    e.others = live_shares(b.shares, acc, holds_key)
  end
  subjects[#subjects + 1] = e
end
for i = pairs_end + 1, late_end, 6 do
  if ARGV[i + 4] ~= '' then
    local spent = redis.call('HGET', budgets_key, 's:' .. ARGV[i + 4])
    if spent then parse_spent(spent) end
  end
end

-- Charges n credits of feature's (a refund when below zero), counted on day
-- in period pn: usage this period only when pn is this one, and never below
-- zero, as neither is the day's.
local function spend(feature, n, day, pn)
  if n > 0 then
    event(acc, 'charge', hold_capture(acc, h, n), feature, id)
    if pn == acc.pn then
      add_used(acc, feature, n, day)
    else
      add_day(acc, feature, n, day)
    end
  elseif n < 0 then
    event(acc, 'refund', hold_refund(acc, h, -n), feature, id)
    if pn == acc.pn then
      add_used(acc, feature, math.max(n, -used_of(acc, feature)), false)
    end
    add_day(acc, feature, math.max(n, -used_on(acc, feature, day)), day)
  end
end

for i = 17, pairs_end, 2 do
  spend(ARGV[i], tonumber(ARGV[i + 1]), nil, acc.pn)
end
for i = pairs_end + 1, late_end, 6 do
  local day = ARGV[i + 1]
  if day == '' then day = nil end
  local pn = tonumber(ARGV[i + 2])
  if pn < 0 then pn = acc.pn end
  spend(ARGV[i], tonumber(ARGV[i + 3]), day, pn)
end

local kept = 0
if keeps(h) then kept = hold_amount(h) end
local grant = math.max(math.min(unspent, kept), math.min(want, kept + available(acc) - keep))
if grant > kept then
  hold_more(acc, h, grant - kept)
elseif grant < kept then
  local delta = hold_less(acc, h, kept - grant)
  if delta ~= 0 then
    -- What it gave back of an ended period's allowance is gone with it.
    event(acc, 'release', delta, '', id)
  end
end
h.seq, h.rep = seq, srv_now()
if grant > 0 then
  h.state, h.untl = LIVE, srv_now() + ttl
  note_expiry(acc, h.untl)
elseif keeps(h) or h.untl < srv_now() then
  h.state, h.untl = RELEASED, srv_now() + HOLD_KEPT_MS
end
-- The subjects' budgets: what their calls spent, and the shares the lease
-- holds now.
local out = {OK, grant, balance(acc), today(), acc.pn}
for j, e in ipairs(subjects) do
  local i = late_end + 1 + 5 * (j - 1)
  local b, wid, n = e.b, ARGV[i + 1], tonumber(ARGV[i + 2])
  local swant, sunspent = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if not b then
    if e.raw then redis.call('HDEL', budgets_key, 'r:' .. ARGV[i]) end
    out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = -1, '', 0, 0, 0
  else
    -- Spending of a window that has ended stays with it; a subject that
    -- had no budget when it spent counts in this window.
    if n ~= 0 and (wid == b.wid or wid == '') then
      b.spent = math.max(b.spent + n, 0)
      write_spent(b)
    end
    local mine = 0
    if wid == b.wid then mine = math.max(e.mine - math.max(n, 0), 0) end
    local share = 0
    if grant > 0 then
      local free = b.limit - b.spent - e.others
      share = math.max(math.min(sunspent, mine), math.min(swant, math.floor(free / 2)), 0)
      -- Never more than the limit leaves: a lowered limit shrinks the
      -- share, even below what the lease may be spending now.
      share = math.min(share, math.max(free, 0))
    end
    b.shares[id] = share
    write_shares(b, e.raw)
    out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = share, b.wid,
      window_end(b.window, acc) - now_ms, b.limit, b.spent
  end
end
-- Corrections count in the budget window their calls were charged in,
-- after the shares, which they do not change.
for i = pairs_end + 1, late_end, 6 do
  if ARGV[i + 4] ~= '' then
    budget_settle(budgets_key, ARGV[i + 4], ARGV[i + 5], tonumber(ARGV[i + 3]))
  end
end
commit(account_key, calls_key, acc, true)
write_holds(holds_key, acc, {[id] = h})
return out
