-- KEYS: account, call log, holds. ARGV[8] lease id, ARGV[9] sync number,
-- ARGV[10] credits the lease wants to hold, ARGV[11] credits the lease must
-- leave free for others, ARGV[12] the lease's lifetime in ms, ARGV[13] the
-- credits the lease held unspent when it sent the sync (it may spend them
-- while the sync is on its way), ARGV[14] n, then n pairs of feature and net
-- credits spent since the last sync, then quadruples of feature, day
-- (yyyymmdd, or empty: today), period number (-1: this one) and credits:
-- corrections of calls an earlier sync reported (a refund below zero, usage
-- above the cost above), which count on the day and in the period that sync
-- charged them.
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
-- Returns {code, held, balance, day, period}: OK applied, REPEAT a repeat;
-- day and period are those the sync's spending was charged on and in.

--#include lib/holds.lua

local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, calls_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]
local seq = tonumber(ARGV[9])
local want = tonumber(ARGV[10])
local keep = tonumber(ARGV[11])
local ttl = tonumber(ARGV[12])
local unspent = tonumber(ARGV[13])
local pairs_end = 14 + 2 * tonumber(ARGV[14])

local spends = false
for i = 15, pairs_end, 2 do
  if tonumber(ARGV[i + 1]) ~= 0 then spends = true end
end
for i = pairs_end + 1, #ARGV, 4 do
  if tonumber(ARGV[i + 3]) ~= 0 then spends = true end
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
h = h or new_hold(acc, 'lease')

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

for i = 15, pairs_end, 2 do
  spend(ARGV[i], tonumber(ARGV[i + 1]), nil, acc.pn)
end
for i = pairs_end + 1, #ARGV, 4 do
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
commit(account_key, calls_key, acc, true)
write_holds(holds_key, acc, {[id] = h})
return {OK, grant, balance(acc), today(), acc.pn}
