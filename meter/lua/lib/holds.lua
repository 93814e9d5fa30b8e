-- Holds and leases: credits set aside, and what their ends give back.

--#include lib/account.lua

-- Holds. The holds hash maps a hold's id to its record:
-- "state ofa fa fp pn until seq cap cfa cfp cfd feature [rep]": state l
-- (live), u (unreported: a lease whose gateway did not report within its
-- lifetime), x (expired), c (captured) or r (released); ofa, fa and fp the
-- credits it keeps of an ended period's allowance, of period pn's allowance
-- and of purchased credits; until its expiry (live), when it is released
-- anyway (unreported) or when the record goes (otherwise), in Redis ms; seq
-- the last sync number of a lease; cap the credits captured; cfa, cfp and
-- cfd the parts of what was captured, for a lease's refunds; feature the
-- usage label; rep, a lease's alone, its last report in Redis ms. A lease is
-- a hold too, captured as its calls spend it; its id starts with "lease:".
local LIVE, UNREPORTED, EXPIRED, CAPTURED, RELEASED = 'l', 'u', 'x', 'c', 'r'

-- How long a lease whose gateway stopped reporting keeps its credits after
-- its last report. The gateway may have spent them and not been able to
-- say so: they are given to no one else until it reports, an operator
-- releases the lease, or this time has passed.
local UNREPORTED_KEPT_MS = 86400000

local function is_lease(id)
  return string.sub(id, 1, 6) == 'lease:'
end

-- The ref of a hold's events: a lease's id, "hold:<id>" for others.
local function hold_ref(id)
  if is_lease(id) then return id end
  return 'hold:' .. id
end

-- Whether a hold keeps credits: live, or a lease not heard from.
local function keeps(h)
  return h.state == LIVE or h.state == UNREPORTED
end

local function parse_hold(acc, s)
  -- The parts of extra grants, " g:<parts>" kept and " c:<parts>"
  -- captured, end the record when there are any.
  local cg, hg = '', ''
  s = string.gsub(s, ' c:(%S+)$', function(x) cg = x return '' end)
  s = string.gsub(s, ' g:(%S+)$', function(x) hg = x return '' end)
  local st, ofa, fa, fp, pn, untl, seq, cap, cfa, cfp, cfd, feature, rep = string.match(s,
    '^(%a) (%d+) (%d+) (%d+) (%-?%d+) (%d+) (%d+) (%-?%d+) (%d+) (%d+) (%d+) (%S+) ?(%d*)$')
  if not st then
    error('corrupt hold record')
  end
  local h = {state = st, ofa = tonumber(ofa), fa = tonumber(fa), fp = tonumber(fp), pn = tonumber(pn),
    untl = tonumber(untl), seq = tonumber(seq), cap = tonumber(cap), cfa = tonumber(cfa),
    cfp = tonumber(cfp), cfd = tonumber(cfd), feature = feature, rep = tonumber(rep) or 0,
    g = parse_parts(hg), cg = parse_parts(cg)}
  -- A period ended since the record was written: the allowance it keeps is
  -- an ended period's, and what it captured is no longer given back but for
  -- purchased credits and extra grants (a lease's captures are not told
  -- apart by period).
  if h.pn ~= acc.pn then
    h.ofa, h.fa, h.cfa, h.cfd, h.pn = h.ofa + h.fa, 0, 0, 0, acc.pn
  end
  return h
end

local function hold_str(h)
  local s = table.concat({h.state, str(h.ofa), str(h.fa), str(h.fp), str(h.pn), str(h.untl), str(h.seq),
    str(h.cap), str(h.cfa), str(h.cfp), str(h.cfd), h.feature}, ' ')
  if h.rep > 0 then s = s .. ' ' .. str(h.rep) end
  local g, cg = parts_str(h.g), parts_str(h.cg)
  if g ~= '' then s = s .. ' g:' .. g end
  if cg ~= '' then s = s .. ' c:' .. cg end
  return s
end

local function hold_amount(h)
  local n = h.ofa + h.fa + h.fp
  for _, x in pairs(h.g) do n = n + x end
  return n
end

local function new_hold(acc, feature)
  return {state = RELEASED, ofa = 0, fa = 0, fp = 0, pn = acc.pn, untl = 0, seq = 0, cap = 0, cfa = 0, cfp = 0,
    cfd = 0, feature = feature or '-', rep = 0, g = {}, cg = {}}
end

-- Sets n more credits of the available balance aside in hold h.
local function hold_more(acc, h, n)
  local p = take(acc, n)
  h.fa, h.fp = h.fa + p.fa, h.fp + p.fp
  acc.ha, acc.hp = acc.ha + p.fa, acc.hp + p.fp
  for id, x in pairs(p.g or {}) do
    local g = grant_of(acc, id)
    g.held = g.held + x
    changed(acc)
    h.g[id] = (h.g[id] or 0) + x
  end
end

-- Takes up to n of what hold h keeps of extra grants, those that ended
-- first: a live grant's part goes back to it (back true) or is spent; an
-- ended grant's is gone either way. Returns what it took, and the parts
-- taken of each grant.
local function hold_grants(acc, h, n, back)
  local ids = {}
  for id in pairs(h.g) do ids[#ids + 1] = id end
  local function ended(id)
    local g = grant_of(acc, id)
    return not (g and grant_live(g))
  end
  table.sort(ids, function(x, y)
    local ex, ey = ended(x), ended(y)
    if ex ~= ey then return ex end
    return tonumber(x) < tonumber(y)
  end)
  local took, parts = 0, {}
  for _, id in ipairs(ids) do
    if n == 0 then break end
    local x = math.min(n, h.g[id])
    h.g[id] = h.g[id] - x
    if h.g[id] == 0 then h.g[id] = nil end
    local g = grant_of(acc, id)
    if g and grant_live(g) then
      g.held = g.held - x
      if back then g.rem = g.rem + x end
      changed(acc)
    else
      acc.hq = acc.hq - x
    end
    parts[id] = x
    n, took = n - x, took + x
  end
  return took, parts
end

-- Gives back up to n of what hold h keeps, to the grants it came from: this
-- period's allowance, purchased credits and live extra grants get theirs
-- back to be spent again; an ended period's allowance and ended grants' are
-- gone with them. Returns the change to the balance.
local function hold_less(acc, h, n)
  local before = balance(acc)
  local o = math.min(n, h.ofa)
  h.ofa, acc.ho, n = h.ofa - o, acc.ho - o, n - o
  local took = hold_grants(acc, h, n, true)
  n = n - took
  local f = math.min(n, h.fp)
  h.fp, acc.hp, acc.pur, n = h.fp - f, acc.hp - f, acc.pur + f, n - f
  local a = math.min(n, h.fa)
  h.fa, acc.ha, acc.rem = h.fa - a, acc.ha - a, acc.rem + a
  return balance(acc) - before
end

-- Charges n credits from hold h: what it keeps first (an ended period's
-- allowance, extra grants', this period's allowance, then purchased
-- credits), then, for usage above the hold, the available balance, into
-- debt if it must. Returns the change to the balance.
local function hold_capture(acc, h, n)
  local before = balance(acc)
  local o = math.min(n, h.ofa)
  h.ofa, acc.ho, n = h.ofa - o, acc.ho - o, n - o
  local took, parts = hold_grants(acc, h, n, false)
  n = n - took
  for id, x in pairs(parts) do h.cg[id] = (h.cg[id] or 0) + x end
  local a = math.min(n, h.fa)
  h.fa, acc.ha, h.cfa, n = h.fa - a, acc.ha - a, h.cfa + a, n - a
  local f = math.min(n, h.fp)
  h.fp, acc.hp, h.cfp, n = h.fp - f, acc.hp - f, h.cfp + f, n - f
  if n > 0 then
    local p = take(acc, n)
    h.cfa, h.cfp, h.cfd = h.cfa + p.fa, h.cfp + p.fp, h.cfd + p.fd
    for id, x in pairs(p.g or {}) do h.cg[id] = (h.cg[id] or 0) + x end
  end
  return balance(acc) - before
end

-- Gives back up to n credits that hold h captured (a lease's call refunded
-- after its spending was reported), as give_back does for a charge.
local function hold_refund(acc, h, n)
  local p = {fa = h.cfa, fp = h.cfp, fd = h.cfd, pn = acc.pn, g = h.cg}
  local back = give_back(acc, p, n)
  h.cfa, h.cfp, h.cfd, h.cg = p.fa, p.fp, p.fd, p.g or {}
  return back
end

-- Ends every live hold whose time has passed, giving its credits back, and
-- drops the records whose time to be kept has passed. A lease whose time
-- has passed is not ended but unreported: it keeps its credits until its
-- gateway reports, or UNREPORTED_KEPT_MS after its last report. It reads the
-- holds hash only when the earliest expiry is due, or when force is set;
-- what it changed waits in acc.swept for write_holds.
local function sweep(acc, key, force)
  if not force and not (acc.hx and acc.hx <= srv_now()) then return end
  local raw = redis.call('HGETALL', key)
  local hx = nil
  local out = {}
  for i = 1, #raw, 2 do
    local id = raw[i]
    local h = parse_hold(acc, raw[i + 1])
    local changed = false
    if h.state == LIVE and h.untl <= srv_now() and is_lease(id) then
      -- A lease of an earlier version has no rep: its expiry stands for it.
      local last = h.rep
      if last == 0 then last = h.untl end
      h.state, h.untl, changed = UNREPORTED, last + UNREPORTED_KEPT_MS, true
    end
    if keeps(h) and h.untl <= srv_now() then
      local delta = hold_less(acc, h, hold_amount(h))
      h.state, h.untl = EXPIRED, srv_now() + HOLD_KEPT_MS
      event(acc, 'expire', delta, h.feature, hold_ref(id))
      out[id] = {h, true}
    elseif not keeps(h) and h.untl <= srv_now() then
      out[id] = {nil, true}
    else
      if keeps(h) and (not hx or h.untl < hx) then hx = h.untl end
      out[id] = {h, changed}
    end
  end
  if acc.hx ~= hx then
    acc.hx, acc.hx_dirty = hx, true
  end
  acc.swept = out
end

-- Reads the hold with id, as sweep left it if it ran; nil when there is none.
local function get_hold(acc, key, id)
  if acc.swept then
    local e = acc.swept[id]
    return e and e[1]
  end
  local v = redis.call('HGET', key, id)
  if not v then return nil end
  local h = parse_hold(acc, v)
  if not keeps(h) and h.untl <= srv_now() then
    -- Its time to be kept has passed; sweep drops it.
    return nil
  end
  return h
end

-- Loads the account and the hold with id, as a capture or a release acts
-- on them; the hold is nil when the org or the hold is unknown.
local function find_hold(account_key, holds_key, id)
  local acc = load(account_key, true)
  if not acc then return nil, nil end
  sweep(acc, holds_key)
  return acc, get_hold(acc, holds_key, id)
end

-- Notes a live hold's expiry in the account, so that sweep runs when it is
-- due.
local function note_expiry(acc, untl)
  if not acc.hx or untl < acc.hx then
    acc.hx, acc.hx_dirty = untl, true
  end
end

-- Writes what sweep changed and the records in `changed` (id -> record),
-- and keeps the hash at least as long as every record it writes must stay.
local function write_holds(key, acc, changed)
  changed = changed or {}
  for id, e in pairs(acc.swept or {}) do
    if not changed[id] and e[2] then
      if e[1] then
        changed[id] = e[1]
      else
        redis.call('HDEL', key, id)
      end
    end
  end
  local last = 0
  for id, h in pairs(changed) do
    redis.call('HSET', key, id, hold_str(h))
    local t = h.untl
    if keeps(h) then t = t + HOLD_KEPT_MS end
    if t > last then last = t end
  end
  if last > 0 and last > srv_now() and redis.call('PTTL', key) < last - srv_now() then
    redis.call('PEXPIRE', key, last - srv_now())
  end
end
