-- KEYS: account, call log, holds. ARGV[8] lease id, ARGV[9] sync number,
-- ARGV[10] credits the lease wants to hold, ARGV[11] credits the lease must
-- leave free for others, ARGV[12] the lease's lifetime in ms, ARGV[13] the
-- credits the lease held unspent when it sent the sync (it may spend them
-- while the sync is on its way), then feature and net credits spent pairs
-- since the last sync.
--
-- A lease is a hold of the gateway's. The sync captures the spending it
-- reports from the hold (a refund of a reported call gives back what the
-- lease captured, to where it came from), then sets what the hold keeps:
-- what the lease wants, as far as the available balance allows, and never
-- less than what it held unspent, which it may be spending. The hold expires
-- by Redis' clock unless synced within its lifetime. A sync number already
-- applied changes nothing (a repeat after a lost reply): the record stays,
-- holding 0 once the lease has ended, for a day.
-- Returns {code, held, balance}: OK applied, REPEAT a repeat.
local bad = check_types({'hash', 'list', 'hash'})
if bad then return bad end
local account_key, events_key, holds_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[8]
local seq = tonumber(ARGV[9])
local want = tonumber(ARGV[10])
local keep = tonumber(ARGV[11])
local ttl = tonumber(ARGV[12])
local unspent = tonumber(ARGV[13])

local spends = false
for i = 14, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) ~= 0 then spends = true end
end

local acc = load(account_key)
if not acc then
  local fresh = new_account(def_allowance, def_month)
  if not spends and math.min(want, available(fresh) - keep) <= 0 then
    -- An org Redis has never seen, with nothing to report and too few
    -- credits to lease: nothing is written.
    return {OK, 0, balance(fresh)}
  end
  acc = open(account_key)
end
sweep(acc, holds_key)
local h = get_hold(acc, holds_key, id)
if h and seq <= h.seq then
  local n = 0
  if h.state == 'l' then n = hold_amount(h) end
  return {REPEAT, n, balance(acc)}
end
h = h or new_hold(acc, 'lease')
local ref = 'lease:' .. id

for i = 14, #ARGV, 2 do
  local feature, n = ARGV[i], tonumber(ARGV[i + 1])
  if n > 0 then
    event(acc, 'charge', hold_capture(acc, h, n), feature, ref)
    add_used(acc, feature, n)
  elseif n < 0 then
    event(acc, 'refund', hold_refund(acc, h, -n), feature, ref)
    -- A lease does not know which day a refunded call was charged on:
    -- neither this period's usage nor today's goes below zero.
    add_used(acc, feature, math.max(n, -used_of(acc, feature)), false)
    add_day(acc, feature, math.max(n, -used_today(acc, feature)))
  end
end

local kept = 0
if h.state == 'l' then kept = hold_amount(h) end
local grant = math.max(math.min(unspent, kept), math.min(want, kept + available(acc) - keep))
if grant > kept then
  hold_more(acc, h, grant - kept)
elseif grant < kept then
  local delta = hold_less(acc, h, kept - grant)
  if delta ~= 0 then
    -- What it gave back of an ended period's allowance is gone with it.
    event(acc, 'release', delta, '', ref)
  end
end
h.seq = seq
if grant > 0 then
  h.state, h.untl = 'l', srv_now() + ttl
  note_expiry(acc, h.untl)
elseif h.state == 'l' or h.untl < srv_now() then
  h.state, h.untl = 'r', srv_now() + HOLD_KEPT_MS
end
commit(account_key, events_key, acc, true)
write_holds(holds_key, acc, {[id] = h})
return {OK, grant, balance(acc)}
