-- The account: its fields, loading it, taking and giving back credits,
-- usage, events, and writing it back.

--#include lib/fields.lua

-- The account hash's fields but u:<feature>, <yyyymmdd>:<feature>, gl, gs and
-- g:<id>, and the value each reads as when it is absent (nil: no default;
-- a, rem and nx must be there; ps, absent, is the start of the plan year
-- that ends at nx). A field at its default is not written: an idle org's
-- hash holds what tells it apart, and no more.
--
-- An org's credits are grants. Two of them live in the account's own
-- fields: this period's allowance (rem: what is free of it; below zero it
-- is debt, which the next credits granted repay first) and the standing
-- purchased grant (pur: top-ups with no expiry, and positive adjustments,
-- all of one kind and priority, so they are one grant). Every other grant
-- (rollover, purchased with an expiry, promotional) has a field g:<id> of
-- its own (parse_grant), written when it is made and when it ends.
--
-- gl is what a charge reads and writes of them, in one field:
-- "gf gh gx hq|order". gf and gh are what the live grants have left and
-- what holds took from them, in all (so the balance needs no reading of
-- the order); gx the Redis second at which the earliest grant starts or
-- expires (0: none); hq the credits live holds took from grants that have
-- since ended. The order is the burn-down order of the live and pending
-- grants: 'a' (the allowance), 'p' (the standing purchased grant) and, for
-- each other grant, "id:rem" or "id:rem:held" ("p" after it while
-- pending). gl is absent while an org has no other grant.
--
-- gs holds what changes seldom (GS, below): gn the last grant id given; dp
-- the debt of this period that credits granted since repaid (a refund of
-- the charge that made it gives them back as purchased credits); gr the id
-- of this period's rollover grant (0: none); ro the plan's rollover, pr
-- that of the plan waiting for the next recharge.
local FIELDS = {'a', 'm', 'own', 'rem', 'pur', 'ps', 'nx', 'pn', 'cd', 'seq', 'ha', 'ho', 'hp', 'hx', 'pa', 'pm'}
local DEFAULTS = {m = 1, own = 0, pur = 0, pn = 0, cd = 0, seq = 0, ha = 0, ho = 0, hp = 0}
local REQUIRED = {'a', 'rem', 'nx'}

-- What a charge reads of them (HOT, in lib/fields.lua), and what only a
-- recharge, a refund, a plan or a reply needs (COLD: the plan, the period's
-- start, the debt carried): read once, when a script first uses one
-- (need_cold), so that a charge's read asks for no field it does not use.
-- Each field Redis looks up in a small hash costs a scan of it.
local COLD = {'a', 'm', 'own', 'ps', 'cd', 'pa', 'pm'}

-- What changes seldom is one field, gs ("gn dp gr ro pr"), absent while
-- every part is at its default, and read only when a script uses one of
-- its parts (need_gs): a charge reads and writes none of it. pr -1 is none.
local GS = {'gn', 'dp', 'gr', 'ro', 'pr'}
local GS_DEFAULTS = {gn = 0, dp = 0, gr = 0, ro = 0, pr = -1}

local function parse_gs(acc)
  acc.gs_read = true
  if not acc.gs_fetched and not acc.created then
    acc.gs0 = redis.call('HGET', acc.key, 'gs') or nil
  end
  local s = acc.gs0
  local v = {}
  if s then
    for n in string.gmatch(s, '%-?%d+') do v[#v + 1] = tonumber(n) end
    if #v ~= #GS then error('account field gs is corrupt') end
  end
  for i, f in ipairs(GS) do
    local x = v[i] or GS_DEFAULTS[f]
    if f == 'pr' and x == -1 then x = nil end
    acc[f] = x
  end
end

-- Reads gs, once, before a script first uses one of its parts.
local function need_gs(acc)
  if not acc.gs_read then parse_gs(acc) end
end

-- The gs field of acc, or nil when every part is at its default.
local function gs_str(acc)
  local parts, any = {}, false
  for i, f in ipairs(GS) do
    local v = acc[f]
    if v == nil then v = GS_DEFAULTS[f] end
    if v ~= GS_DEFAULTS[f] then any = true end
    parts[i] = string.format('%d', v)
  end
  if any then return table.concat(parts, ' ') end
  return nil
end


-- Grant kinds and states, as the admin API names them in full.
local ALLOWANCE, ROLLOVER, PURCHASED, PROMOTIONAL = 'a', 'r', 'p', 'o'
local GRANT_PENDING, GRANT_LIVE, GRANT_SPENT, GRANT_EXPIRED, GRANT_VOIDED = 'p', 'l', 's', 'x', 'v'

-- The priority of the grants the account keeps in its own fields.
local DEFAULT_PRIORITY = 50

-- How long a grant that ended stays listed.
local ENDED_KEPT_MS = 90 * 86400000

-- A grant's field: "state kind amount priority effective expires ended":
-- amount what it gave, effective and expires (0: never) in Redis seconds,
-- ended when it was spent, expired or voided (0: not yet). What remains of
-- it and what holds took from it are in gl while it is live or pending
-- (both 0 once it ended). Its reference and reason are in the org's grant
-- references (grant_refs), apart, so that an account's fields stay short
-- whatever they say.
local function parse_grant(id, s)
  local st, kind, amount, prio, eff, exp, ended = string.match(s, '^(%a) (%a) (%d+) (%d+) (%d+) (%d+) (%d+)$')
  if not st then
    error('corrupt grant record')
  end
  return {id = id, state = st, kind = kind, amount = tonumber(amount), rem = 0, held = 0, prio = tonumber(prio),
    eff = tonumber(eff) * 1000, exp = tonumber(exp) * 1000, ended = tonumber(ended) * 1000, full = true}
end

-- Redis seconds of ms: a grant's times are whole seconds (new_grant).
local function secs(ms)
  return math.floor(ms / 1000)
end

local function grant_str(g)
  return string.format('%s %s %d %d %d %d %d', g.state, g.kind, g.amount, g.prio, secs(g.eff), secs(g.exp),
    secs(g.ended))
end

-- A grant as the admin API reads it: "state kind amount remaining held
-- priority effective expires ended ref [reason]", times in Redis ms.
local function grant_view(g)
  local s = string.format('%s %s %d %d %d %d %d %d %d %s', g.state, g.kind, g.amount, g.rem, g.held, g.prio,
    secs(g.eff) * 1000, secs(g.exp) * 1000, secs(g.ended) * 1000, g.ref or '-')
  if g.reason and g.reason ~= '' then s = s .. ' ' .. g.reason end
  return s
end

-- Reads the org's grant references (key: a hash of id -> "ref [reason]")
-- into the grants read, once.
local function grant_refs(acc, key)
  if acc.refs_read then return end
  acc.refs_read = true
  local raw = redis.call('HGETALL', key)
  acc.grefs = {}
  for i = 1, #raw, 2 do
    local ref, reason = string.match(raw[i + 1], '^(%S+) ?(.*)$')
    acc.grefs[raw[i]] = {ref, reason}
  end
end

-- Writes grant g's reference and reason to the grant references at key.
local function write_grant_ref(key, g)
  if (g.ref or '-') == '-' and (g.reason or '') == '' then return end
  local v = g.ref or '-'
  if g.reason and g.reason ~= '' then v = v .. ' ' .. g.reason end
  redis.call('HSET', key, g.id, v)
end

local function grant_live(g)
  return g.state == GRANT_LIVE
end

-- Reads gl: acc.order, the burn-down order ('a', 'p' and grants), and
-- acc.gmap, the grants by id. A grant read from gl has its id, state,
-- remaining and held; grant_full reads the rest from its field.
local function parse_order(acc, gl)
  acc.order, acc.gmap = {}, acc.gmap or {}
  for t in string.gmatch(gl, '%S+') do
    if t == 'a' or t == 'p' then
      acc.order[#acc.order + 1] = t
    else
      local id, rem, hld, pend = string.match(t, '^(%d+):(%d+):?(%d*)(p?)$')
      if not id then error('corrupt grant order') end
      local g = {id = id, rem = tonumber(rem), held = tonumber(hld) or 0, state = GRANT_LIVE}
      if pend ~= '' then g.state = GRANT_PENDING end
      acc.order[#acc.order + 1] = g
      acc.gmap[id] = g
    end
  end
end

-- Reads gl into acc.order when a caller needs the grants themselves.
local function need_order(acc)
  if not acc.order and acc.gl then parse_order(acc, acc.gl) end
end

-- Fills in what gl does not say of grants gs (kind, amount, times,
-- reference), from their fields, in one read.
local function grants_full(acc, gs)
  local need, fields = {}, {}
  for _, g in ipairs(gs) do
    if not g.full then
      need[#need + 1] = g
      fields[#fields + 1] = 'g:' .. g.id
    end
  end
  if #need == 0 then return end
  local vals
  if acc.records then
    vals = {}
    for i, g in ipairs(need) do vals[i] = acc.records[g.id] end
  else
    vals = redis.call('HMGET', acc.key, unpack(fields))
  end
  for i, g in ipairs(need) do
    if not vals[i] then error('grant ' .. g.id .. ' is missing') end
    local r = parse_grant(g.id, vals[i])
    g.kind, g.amount, g.prio, g.eff, g.exp, g.ended, g.full = r.kind, r.amount, r.prio, r.eff, r.exp, r.ended, true
  end
end

-- The grants in acc.order.
local function order_grants(acc)
  need_order(acc)
  local gs = {}
  for _, e in ipairs(acc.order or {}) do
    if type(e) == 'table' then gs[#gs + 1] = e end
  end
  return gs
end

local function all_full(acc)
  grants_full(acc, order_grants(acc))
end

-- The extra grants' sums: free (remaining of live ones) and held (what
-- holds took from live ones): gf and gh while gl is not read, else counted
-- again after a grant changes (changed).
local function grant_sums(acc)
  if not acc.order then return acc.gf, acc.gh end
  local s = acc.sums
  if not s then
    local free, hld = 0, 0
    for _, e in ipairs(acc.order) do
      if type(e) == 'table' and e.state == GRANT_LIVE then
        free, hld = free + e.rem, hld + e.held
      end
    end
    s = {free, hld}
    acc.sums = s
  end
  return s[1], s[2]
end

-- Notes that a grant's remaining, held or state changed: gl is written
-- again, and the sums read again.
local function changed(acc)
  acc.gl_dirty, acc.sums = true, nil
end

local function held(acc)
  local _, gh = grant_sums(acc)
  return acc.ha + acc.ho + acc.hp + acc.hq + gh
end

local function available(acc)
  local gf = grant_sums(acc)
  return acc.rem + acc.pur + gf
end

local function balance(acc)
  return available(acc) + held(acc)
end

local function event(acc, kind, delta, feature, ref, at_ms, reason)
  table.insert(acc.events, {kind, delta, balance(acc), feature or '', ref or '', at_ms or now_ms, reason})
end

-- Repays debt (a negative rem) out of n credits just granted; returns what
-- is left of them.
local function repay(acc, n)
  need_gs(acc)
  local r = math.min(n, math.max(-acc.rem, 0))
  acc.rem, acc.dp = acc.rem + r, acc.dp + r
  return n - r
end

-- Marks grant g's own field to be written (its state changed, or it is
-- new), for commit. g must be full.
local function touch(acc, g)
  acc.gdirty = acc.gdirty or {}
  acc.gdirty[g.id] = g
  changed(acc)
end

-- Adds grant g (full) to the burn-down order, and to the grants written.
local function add_grant(acc, g)
  need_order(acc)
  if not acc.order then
    acc.order, acc.gmap = {'a', 'p'}, acc.gmap or {}
  end
  acc.order[#acc.order + 1] = g
  acc.gmap[g.id] = g
  acc.reorder, acc.gx_dirty = true, true
  touch(acc, g)
  return g
end

-- Ends grant g (spent, expired or voided) at Redis time t: what live holds
-- took from it stays theirs (hq); what remains of it is gone. Returns the
-- credits lost.
local function end_grant(acc, g, state, t)
  grants_full(acc, {g})
  local lost = 0
  if g.state == GRANT_LIVE then
    lost = g.rem
    acc.hq = acc.hq + g.held
  end
  g.state, g.rem, g.held, g.ended = state, 0, 0, t
  acc.gx_dirty = true
  touch(acc, g)
  return lost
end

-- Makes the extra grants whose time came live or expired, by Redis' clock:
-- a pending grant that becomes live repays debt first (event grant); an
-- expired one loses what remains of it (event expire). A rollover grant
-- expires with its period, at the recharge (start_period).
local function grant_times(acc)
  if not acc.gl or not acc.gx or acc.gx > srv_now() then return end
  local t = srv_now()
  all_full(acc)
  -- The grants that became live, in the order they did (then by id): the
  -- first repays debt first.
  local due = {}
  for _, g in ipairs(order_grants(acc)) do
    if g.state == GRANT_PENDING and g.eff <= t then due[#due + 1] = g end
  end
  table.sort(due, function(x, y)
    if x.eff ~= y.eff then return x.eff < y.eff end
    return tonumber(x.id) < tonumber(y.id)
  end)
  for _, g in ipairs(due) do
    g.state = GRANT_LIVE
    g.rem = repay(acc, g.rem)
    acc.reorder = true
    touch(acc, g)
    event(acc, 'grant', g.amount, '', 'g' .. g.id, g.eff)
  end
  for _, g in ipairs(order_grants(acc)) do
    if g.state == GRANT_LIVE and g.kind ~= ROLLOVER and g.exp > 0 and g.exp <= t then
      local lost = end_grant(acc, g, GRANT_EXPIRED, g.exp)
      event(acc, 'expire', -lost, '', 'g' .. g.id, g.exp)
    end
  end
  acc.gx_dirty = true
end

-- A new extra grant: the next id, at Redis time eff (pending until then).
local function new_grant(acc, kind, amount, prio, eff, exp, ref, reason)
  need_gs(acc)
  acc.gn = acc.gn + 1
  -- Whole seconds: a grant starts at the second it is given (or was asked
  -- to), and expires at the end of the second asked for, never before.
  eff = math.floor(eff / 1000) * 1000
  exp = math.ceil(exp / 1000) * 1000
  return {id = str(acc.gn), state = GRANT_LIVE, kind = kind, amount = amount, rem = amount, held = 0, prio = prio,
    eff = eff, exp = exp, ended = 0, ref = ref or '-', reason = reason, full = true}
end

-- How many extra grants are live or pending.
local function open_grants(acc)
  local n = 0
  for _, g in ipairs(order_grants(acc)) do
    if g.state == GRANT_LIVE or g.state == GRANT_PENDING then n = n + 1 end
  end
  return n
end

-- Grants an extra grant: live at once (repaying debt first) when its
-- effective time has come, pending otherwise. Writes the grant event, whose
-- delta is what it adds to the balance now.
local function grant(acc, g)
  if g.eff > srv_now() then
    g.state = GRANT_PENDING
    add_grant(acc, g)
    event(acc, 'grant', 0, '', 'g' .. g.id, nil, g.reason)
  else
    g.rem = repay(acc, g.rem)
    add_grant(acc, g)
    event(acc, 'grant', g.amount, '', 'g' .. g.id, nil, g.reason)
  end
  return g
end

-- An account field's value v as a number; an error, raised before any
-- write, when it is not one.
local function field_number(f, v)
  local n = tonumber(v)
  if not n then
    error('account field ' .. f .. ' is not a number')
  end
  return n
end

-- Fills in the cold fields once they are in acc.stored (load with_used
-- read them all), and checks that the allowance is there.
local function cold_read(acc)
  acc.cold = true
  for _, f in ipairs(COLD) do
    local v = acc.stored[f]
    if v == nil then v = DEFAULTS[f] end
    acc[f] = v
  end
  if not acc.stored.a then
    error('account field a is missing')
  end
  if not acc.ps then acc.ps = ym_unix(acc.nx - 12) end
end

-- Reads the cold fields (COLD), once, before a script first uses one.
local function need_cold(acc)
  if acc.cold then return end
  local raw = redis.call('HMGET', acc.key, unpack(COLD))
  for i, f in ipairs(COLD) do
    if raw[i] then acc.stored[f] = field_number(f, raw[i]) end
  end
  cold_read(acc)
end

-- Starts a new period at period start ps_unix, granting the plan's allowance.
-- The rollover grants carried into the period that ends expire; up to the
-- ending plan's rollover of its unused allowance becomes a rollover grant
-- of the new period; the rest of it expires. The new allowance repays debt
-- first, and debt carries over. Allowance that live holds keep stays
-- theirs, as allowance of an ended period.
local function start_period(acc, ps_unix, next_ym)
  need_cold(acc)
  need_order(acc)
  if acc.order then
    -- The allowance's expiry moves: its place in the order may too.
    all_full(acc)
    acc.reorder = true
    for _, g in ipairs(order_grants(acc)) do
      if g.kind == ROLLOVER and g.state == GRANT_LIVE then
        end_grant(acc, g, GRANT_EXPIRED, ps_unix * 1000)
      end
    end
  end
  need_gs(acc)
  local carry = math.min(math.max(acc.rem, 0), acc.ro or 0)
  if acc.pa then
    acc.a, acc.m, acc.pa, acc.pm = acc.pa, acc.pm, nil, nil
    acc.ro, acc.pr = acc.pr or 0, nil
  end
  acc.cd, acc.dp = math.max(-acc.rem, 0), 0
  acc.rem = acc.a + math.min(acc.rem, 0)
  acc.ho, acc.ha = acc.ho + acc.ha, 0
  acc.pn = (acc.pn or 0) + 1
  acc.ps = ps_unix
  acc.nx = next_ym or next_after(now_ym, acc.m)
  acc.gr = 0
  if carry > 0 then
    acc.gr = acc.gn + 1
    add_grant(acc, new_grant(acc, ROLLOVER, carry, DEFAULT_PRIORITY, ps_unix * 1000, ym_unix(acc.nx) * 1000))
  end
  acc.used = {}
  acc.reset_used = true
  -- A usage field a charge read with the account (load's feature) starts
  -- the new period at zero, as every other feature's does.
  for f in pairs(acc.known or {}) do
    if string.sub(f, 1, 2) == 'u:' then acc.known[f] = 0 end
  end
end

-- Applies the yearly recharges that fell due since the last operation.
local function catch_up(acc)
  local before = balance(acc)
  local due = false
  local guard = 0
  while acc.nx <= now_ym do
    need_cold(acc)
    local at = acc.nx
    start_period(acc, ym_unix(at), next_after(at, acc.pm or acc.m))
    due = true
    guard = guard + 1
    if guard > 1000 then
      acc.nx = next_after(now_ym, acc.m)
    end
  end
  if due then
    event(acc, 'recharge', balance(acc) - before, '', '', acc.ps * 1000)
  end
end

-- A new account's first period is number 0 (the default: not written).
local function new_account(allowance, month)
  local acc = {a = allowance, m = month, own = 0, rem = 0, pur = 0, ha = 0, ho = 0, hp = 0, hq = 0, seq = 0, pn = -1,
    gf = 0, gh = 0, used = {}, used_delta = {}, day_delta = {}, events = {}, created = true, stored = {}, cold = true}
  parse_gs(acc)
  start_period(acc, ym_unix(now_ym - ((now_ym % 12) - (month - 1)) % 12), next_after(now_ym, month))
  return acc
end

-- Loads the account at key, or nil when Redis holds nothing for it. A field
-- that is not a number is an error, raised before any write. With
-- with_used, acc.used holds every feature's usage this period (reply needs
-- it); without, usage is only added to (add_used) or read one feature at a
-- time (used_of), which keeps a charge from reading every feature's field.
-- acc.stored keeps the fields as the hash holds them (nil when absent), so
-- commit writes only what changed. read, with feature, is the reply of that
-- read when the caller made it already (quick_charge). feature, without with_used, is a
-- charge's: its usage this period and today is read with the other fields
-- (acc.known), and commit sets it in the same HSET as the rest, where it
-- would add to each with an HINCRBY of its own.
local function load(key, with_used, feature, read)
  local acc = {key = key, events = {}, used_delta = {}, day_delta = {}, stored = {}}
  local stored = acc.stored
  local gl, gs, records = nil, nil, {}
  if with_used then
    local raw = redis.call('HGETALL', key)
    if #raw == 0 then return nil end
    acc.used = {}
    for i = 1, #raw, 2 do
      local f = raw[i]
      local p2 = string.sub(f, 1, 2)
      if p2 == 'u:' then
        acc.used[string.sub(f, 3)] = field_number(f, raw[i + 1])
      elseif p2 == 'g:' then
        records[string.sub(f, 3)] = raw[i + 1]
      elseif f == 'gl' then
        gl = raw[i + 1]
      elseif f == 'gs' then
        gs = raw[i + 1]
      elseif not is_day(f) then
        stored[f] = field_number(f, raw[i + 1])
      end
    end
    for _, f in ipairs(FIELDS) do
      local v = stored[f]
      if v == nil then v = DEFAULTS[f] end
      acc[f] = v
    end
  else
    -- The hot path of every charge: one pass over the reply. The
    -- feature's fields come first, as unpack must be the last argument.
    local nf, raw = 0, read
    if feature then
      nf = 2
      raw = raw or redis.call('HMGET', key, 'u:' .. feature, today() .. ':' .. feature, unpack(READ))
    else
      raw = redis.call('HMGET', key, unpack(READ))
    end
    gl = raw[nf + #READ]
    for i = 1, #HOT do
      local f = HOT[i]
      local v = raw[nf + i]
      if v then
        v = field_number(f, v)
        stored[f] = v
      else
        v = DEFAULTS[f]
      end
      acc[f] = v
    end
    if feature then
      local day = today() .. ':' .. feature
      acc.known = {['u:' .. feature] = field_number('u:' .. feature, raw[1] or 0),
        [day] = field_number(day, raw[2] or 0)}
    end
    if not stored.rem and not stored.nx and redis.call('EXISTS', key) == 0 then
      return nil
    end
  end
  for _, f in ipairs(REQUIRED) do
    if f ~= 'a' and not stored[f] then
      error('account field ' .. f .. ' is missing')
    end
  end
  if with_used then cold_read(acc) end
  -- gl: "gf gh gx hq|order": what the live grants have left and hold, the
  -- Redis second of the next start or expiry (0: none), what holds keep of
  -- ended grants, then the order.
  acc.gl0, acc.gf, acc.gh, acc.hq = gl, 0, 0, 0
  if gl then
    local gf, gh, gx, hq, order = string.match(gl, '^(%d+) (%d+) (%d+) (%d+)|(.*)$')
    if not gf then error('account field gl is corrupt') end
    acc.gf, acc.gh, acc.hq, acc.gl = tonumber(gf), tonumber(gh), tonumber(hq), order
    if gx ~= '0' then acc.gx = tonumber(gx) * 1000 end
  end
  acc.gs0, acc.gs_fetched = gs, with_used
  if with_used then acc.records = records end
  grant_times(acc)
  catch_up(acc)
  return acc
end

-- Loads the account at key, creating it on the default plan when it is new.
local function open(key, with_used)
  local acc = load(key, with_used)
  if acc then return acc end
  acc = new_account(def_allowance, def_month)
  event(acc, 'grant', acc.rem, '', 'default-plan')
  return acc
end

-- Puts acc.order in burn-down order: priority, then the earliest expiry
-- (none last), then purchased credits after the others (the money paid is
-- kept longest), then the oldest; a rollover grant, as old as the
-- allowance and expiring with it, goes first. It runs when a grant is
-- added, becomes live or is given back, and at each recharge; a charge
-- only follows the order.
local function sort_order(acc)
  acc.reorder, acc.gl_dirty = false, true
  need_cold(acc)
  all_full(acc)
  local key = {}
  for _, e in ipairs(acc.order) do
    if e == 'a' then
      key[e] = {DEFAULT_PRIORITY, ym_unix(acc.nx) * 1000, 0, acc.ps * 1000, math.huge}
    elseif e == 'p' then
      key[e] = {DEFAULT_PRIORITY, math.huge, 1, 0, -1}
    else
      local exp, paid = e.exp, 0
      if exp == 0 then exp = math.huge end
      if e.kind == PURCHASED then paid = 1 end
      key[e] = {e.prio, exp, paid, e.eff, tonumber(e.id)}
    end
  end
  table.sort(acc.order, function(x, y)
    local kx, ky = key[x], key[y]
    for i = 1, 5 do
      if kx[i] ~= ky[i] then return kx[i] < ky[i] end
    end
    return false
  end)
end

-- Takes up to n of this period's allowance (w 'a') or of the standing
-- purchased grant (w 'p') into parts p; returns what it took.
local function take_own(acc, w, n, p)
  local x
  if w == 'a' then
    x = math.min(n, math.max(acc.rem, 0))
    acc.rem, p.fa = acc.rem - x, p.fa + x
  else
    x = math.min(n, math.max(acc.pur, 0))
    acc.pur, p.fp = acc.pur - x, p.fp + x
  end
  return x
end

-- take's way for a charge: gl read one grant at a time, as far as n
-- needs, and only that grant's token written again. Returns what is left
-- of n.
local function take_gl(acc, n, p)
  local gl, pos, spent = acc.gl, 1, false
  while n > 0 do
    local s, e = string.find(gl, '%S+', pos)
    if not s then break end
    local x = 0
    if e == s then
      x = take_own(acc, string.sub(gl, s, s), n, p)
    else
      local id, rem, hld, pend = string.match(string.sub(gl, s, e), '^(%d+):(%d+):?(%d*)(p?)$')
      if not id then error('corrupt grant order') end
      rem = tonumber(rem)
      if pend == '' and rem > 0 then
        x = math.min(n, rem)
        local nt = id .. ':' .. str(rem - x)
        if hld ~= '' then nt = nt .. ':' .. hld end
        gl = string.sub(gl, 1, s - 1) .. nt .. string.sub(gl, e + 1)
        e = s + #nt - 1
        acc.gf, acc.gl_dirty = acc.gf - x, true
        p.g = p.g or {}
        p.g[id] = (p.g[id] or 0) + x
        spent = spent or (rem == x and (hld == '' or hld == '0'))
      end
    end
    n, pos = n - x, e + 1
  end
  acc.gl = gl
  -- A grant spent: commit ends it, from gl read in full.
  if spent then parse_order(acc, gl) end
  return n
end

-- take's way once the grants were read (acc.order). Returns what is left
-- of n.
local function take_ordered(acc, n, p)
  -- A grant added or given back in this script takes its place first.
  if acc.reorder then sort_order(acc) end
  for _, e in ipairs(acc.order) do
    if n == 0 then break end
    if type(e) ~= 'table' then
      n = n - take_own(acc, e, n, p)
    elseif e.state == GRANT_LIVE and e.rem > 0 then
      local x = math.min(n, e.rem)
      e.rem, n = e.rem - x, n - x
      p.g = p.g or {}
      p.g[e.id] = (p.g[e.id] or 0) + x
      changed(acc)
    end
  end
  return n
end

-- Takes n credits of the available balance, from the grants in burn-down
-- order, then (only where the caller allows it) into debt. Returns the
-- parts taken: {fa = allowance, fp = purchased, fd = debt, pn = this
-- period, g = {[id] = credits} of the extra grants, or nil}.
local function take(acc, n)
  local p = {fa = 0, fp = 0, fd = 0, pn = acc.pn}
  if acc.order then
    n = take_ordered(acc, n, p)
  elseif acc.gl then
    n = take_gl(acc, n, p)
  else
    n = n - take_own(acc, 'a', n, p)
    n = n - take_own(acc, 'p', n, p)
  end
  p.fd = n
  acc.rem = acc.rem - n
  return p
end

-- Adds parts q to parts p (the same period's).
local function add_parts(p, q)
  p.fa, p.fp, p.fd = p.fa + q.fa, p.fp + q.fp, p.fd + q.fd
  for id, x in pairs(q.g or {}) do
    p.g = p.g or {}
    p.g[id] = (p.g[id] or 0) + x
  end
end

-- The extra grant with id: one in gl as gl has it, any other (ended) as
-- its field has it; nil when there is none.
local function grant_of(acc, id)
  need_order(acc)
  acc.gmap = acc.gmap or {}
  local g = acc.gmap[id]
  if g then return g end
  local s = acc.records and acc.records[id]
  if not s and not acc.created and not acc.records then s = redis.call('HGET', acc.key, 'g:' .. id) end
  if not s then return nil end
  g = parse_grant(id, s)
  acc.gmap[id] = g
  return g
end

-- The extra grant made with reference ref, or nil, from the grant
-- references at key.
local function grant_by_ref(acc, key, ref)
  grant_refs(acc, key)
  for id, r in pairs(acc.grefs) do
    if r[1] == ref then
      local g = grant_of(acc, id)
      if g then
        grants_full(acc, {g})
        g.ref, g.reason = r[1], r[2]
        return g
      end
    end
  end
  return nil
end

-- Gives n credits back to extra grant id, where a charge or a hold took
-- them. A spent grant that has not expired takes them and is live again; an
-- expired or voided one does not: they are gone with it. Returns what was
-- given back.
local function grant_back(acc, id, n)
  local g = grant_of(acc, id)
  if not g or n == 0 then return 0 end
  -- A rollover grant lives as long as the period it was carried into (gr),
  -- whose end follows the gateways' clocks, not Redis'.
  if g.state == GRANT_SPENT then
    -- A spent grant's own field was read: it is full.
    local alive = g.exp == 0 or g.exp > srv_now()
    if g.kind == ROLLOVER then
      need_gs(acc)
      alive = tonumber(g.id) == acc.gr
    end
    if alive then
      g.state, g.ended = GRANT_LIVE, 0
      add_grant(acc, g)
    end
  end
  if not grant_live(g) then return 0 end
  g.rem = g.rem + n
  changed(acc)
  return n
end

-- The ids of parts' extra grants, highest first: given back in the reverse
-- of the order of their ids.
local function part_ids(g)
  local ids = {}
  for id in pairs(g or {}) do ids[#ids + 1] = id end
  table.sort(ids, function(x, y) return tonumber(x) > tonumber(y) end)
  return ids
end

-- Gives back up to n of the credits a charge took (its parts p, which shrink
-- by what is given back): debt first, then purchased credits, then the
-- extra grants, then allowance. Each part goes back to the grant it came
-- from, and never more than was taken. Allowance taken in a period that
-- has ended is not given back: it expired with its period; nor is what an
-- extra grant gave that has since expired or been voided. Debt is
-- cancelled: this period's at once (what credits granted since repaid of
-- it comes back as purchased credits); an ended period's only as far as it
-- was carried into this one and no refund has cancelled it yet (acc.cd), so
-- a refund never lifts the allowance above the plan. Returns the change to
-- the balance.
local function give_back(acc, p, n)
  local back = 0
  local d = math.min(n, p.fd)
  p.fd, n = p.fd - d, n - d
  if p.pn ~= acc.pn then
    need_cold(acc)
    d = math.min(d, acc.cd)
    acc.cd = acc.cd - d
  end
  -- Debt still owed is cancelled; what credits granted since repaid of it
  -- (dp) goes back as purchased credits, which never expire; the rest was
  -- repaid by the allowance, and goes back to it.
  local c = math.min(d, math.max(-acc.rem, 0))
  need_gs(acc)
  local r = math.min(d - c, acc.dp)
  acc.rem, acc.pur, acc.dp, back = acc.rem + d - r, acc.pur + r, acc.dp - r, back + d
  local f = math.min(n, p.fp)
  p.fp, n = p.fp - f, n - f
  acc.pur, back = acc.pur + f, back + f
  for _, id in ipairs(part_ids(p.g)) do
    local x = math.min(n, p.g[id])
    p.g[id], n = p.g[id] - x, n - x
    if p.g[id] == 0 then p.g[id] = nil end
    back = back + grant_back(acc, id, x)
  end
  local a = math.min(n, p.fa)
  p.fa = p.fa - a
  if p.pn == acc.pn then
    acc.rem, back = acc.rem + a, back + a
  end
  return back
end

-- Adds n to a feature's usage on day (yyyymmdd; today when nil). The day
-- is the call's: a refund counts on the day of the charge it gives back.
local function add_day(acc, feature, n, day)
  if n == 0 then return end
  local f = (day or today()) .. ':' .. feature
  acc.day_delta[f] = (acc.day_delta[f] or 0) + n
end

-- Adds n to a feature's usage this period, and on day (today when nil; not
-- at all when false).
local function add_used(acc, feature, n, day)
  if n == 0 then return end
  acc.used_delta[feature] = (acc.used_delta[feature] or 0) + n
  if acc.used then
    acc.used[feature] = (acc.used[feature] or 0) + n
  end
  if day ~= false then add_day(acc, feature, n, day) end
end

-- A feature's usage on day (yyyymmdd; today when nil), with what this
-- script added to it.
local function used_on(acc, feature, day)
  local f = (day or today()) .. ':' .. feature
  if acc.created then return acc.day_delta[f] or 0 end
  return tonumber(redis.call('HGET', acc.key, f) or 0) + (acc.day_delta[f] or 0)
end

-- A feature's usage this period, with what this script added to it.
local function used_of(acc, feature)
  if acc.used then return acc.used[feature] or 0 end
  return tonumber(redis.call('HGET', acc.key, 'u:' .. feature) or 0) + (acc.used_delta[feature] or 0)
end

-- Writes the account's events, then its fields that changed since load
-- (all of them for a new account, but those at their defaults). A call's
-- script (calls true) writes its events to the org's call log, which
-- expires calls_ttl after the last of them: what a call did is kept in
-- Redis as long as its request marker, and in the usage per day after.
-- The first event is the first write: when the events key is not a list,
-- commit writes nothing and returns the type it holds (nil otherwise).
local function commit(key, events_key, acc, calls)
  -- Events go to a capped list, newest first, one compact string each:
  -- "seq kind delta balance feature ref ms [reason]" ("-" for an empty
  -- field; the reason, when there is one, is the rest of the line). A small
  -- list takes a few hundred bytes, where a stream takes 4 KB.
  if #acc.events > 0 then
    local seq = acc.seq
    local len = 0
    for i, e in ipairs(acc.events) do
      seq = seq + 1
      local feature, ref = e[4], e[5]
      if feature == '' then feature = '-' end
      if ref == '' then ref = '-' end
      local line = string.format('%d %s %d %d %s %s %d', seq, e[1], e[2], e[3], feature, ref, e[6])
      if e[7] then line = line .. ' ' .. e[7] end
      if i == 1 then
        -- The first write: a list of another type stops the script here,
        -- before anything is written. Any other refusal (OOM: Redis at
        -- maxmemory) is the store's, not the data's: raised as it came.
        len = redis.pcall('LPUSH', events_key, line)
        if type(len) == 'table' then
          if string.sub(len.err, 1, 9) ~= 'WRONGTYPE' then error(len) end
          return redis.call('TYPE', events_key)['ok']
        end
      else
        len = redis.call('LPUSH', events_key, line)
      end
    end
    if len > tonumber(events_max) then
      redis.call('LTRIM', events_key, 0, tonumber(events_max) - 1)
    end
    if calls then redis.call('EXPIRE', events_key, calls_ttl) end
    acc.seq = seq
  end
  if acc.reset_used and not acc.created then
    local fields = redis.call('HKEYS', key)
    for _, f in ipairs(fields) do
      if string.sub(f, 1, 2) == 'u:' then redis.call('HDEL', key, f) end
    end
  end
  local gfields = {}
  if acc.order and (acc.gl_dirty or acc.reorder or acc.gx_dirty) then
    -- A live grant with nothing left and nothing held is spent.
    for _, g in ipairs(order_grants(acc)) do
      if g.state == GRANT_LIVE and g.rem == 0 and g.held == 0 then
        end_grant(acc, g, GRANT_SPENT, srv_now())
      end
    end
    if acc.reorder then sort_order(acc) end
    local tokens, extra = {}, false
    local gx = nil
    if acc.gx_dirty then all_full(acc) end
    for _, e in ipairs(acc.order) do
      if type(e) ~= 'table' then
        tokens[#tokens + 1] = e
      elseif e.state == GRANT_LIVE or e.state == GRANT_PENDING then
        extra = true
        local t = e.id .. ':' .. str(e.rem)
        if e.held > 0 then t = t .. ':' .. str(e.held) end
        if e.state == GRANT_PENDING then t = t .. 'p' end
        tokens[#tokens + 1] = t
        if acc.gx_dirty then
          -- gx: when the earliest pending grant starts or live one expires.
          local at = nil
          if e.state == GRANT_PENDING then
            at = e.eff
          elseif e.kind ~= ROLLOVER and e.exp > 0 then
            at = e.exp
          end
          if at and (not gx or at < gx) then gx = at end
        end
      end
    end
    if acc.gx_dirty then acc.gx = gx end
    acc.gf, acc.gh = grant_sums(acc)
    acc.gl = nil
    if extra then acc.gl = table.concat(tokens, ' ') end
  end
  if acc.order or acc.gl_dirty then
    -- gl is kept while there are grants besides the allowance and the
    -- standing purchased grant, or holds keep credits of ended ones.
    local gl = nil
    if acc.gl or acc.hq ~= 0 then
      gl = string.format('%d %d %d %d|%s', acc.gf, acc.gh, math.floor((acc.gx or 0) / 1000), acc.hq, acc.gl or 'a p')
    end
    if gl ~= acc.gl0 then
      if gl then
        gfields[#gfields + 1] = 'gl'
        gfields[#gfields + 1] = gl
      else
        acc.gl_gone = true
      end
    end
  end
  if acc.gdirty then
    for id, g in pairs(acc.gdirty) do
      gfields[#gfields + 1] = 'g:' .. id
      gfields[#gfields + 1] = grant_str(g)
    end
  end
  local set, gone = gfields, {}
  if acc.gl_gone then gone[1] = 'gl' end
  local gs = acc.gs0
  if acc.gs_read then gs = gs_str(acc) end
  if gs ~= acc.gs0 then
    if gs then
      set[#set + 1] = 'gs'
      set[#set + 1] = gs
    else
      gone[#gone + 1] = 'gs'
    end
  end
  local stored = acc.stored
  local fields = HOT
  if acc.cold then fields = FIELDS end
  for i = 1, #fields do
    local f = fields[i]
    local v = acc[f]
    -- A field at its default, or a period start the next recharge
    -- implies, is left out.
    if v == DEFAULTS[f] or (f == 'ps' and v == ym_unix(acc.nx - 12)) then v = nil end
    if v ~= stored[f] then
      if v == nil then
        gone[#gone + 1] = f
      else
        set[#set + 1] = f
        set[#set + 1] = str(v)
      end
    end
  end
  -- Usage is added to: a field load read (acc.known) is set with the
  -- others, any other one gets an HINCRBY. A day's first usage of a
  -- feature (a new field) prunes the days no longer kept: once a day and
  -- feature, not at every call.
  local known = acc.known or {}
  local prune = false
  local add = {}
  for f, n in pairs(acc.used_delta) do
    if n ~= 0 then add['u:' .. f] = n end
  end
  for f, n in pairs(acc.day_delta) do
    if n ~= 0 then add[f] = n end
  end
  for f, n in pairs(add) do
    local was = known[f]
    if was then
      table.insert(set, f)
      table.insert(set, str(was + n))
      if was == 0 and is_day(f) then prune = true end
      add[f] = nil
    end
  end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  for f, n in pairs(add) do
    if redis.call('HINCRBY', key, f, n) == n and is_day(f) then prune = true end
  end
  if prune then prune_days(key) end
end

-- The account as a flat reply: rem, pur, a, m, pa, pm, own, ps, nx, ha, ho,
-- hp, ro, pr, hq, then the free and held credits of the live extra grants
-- of each kind (promotional, rollover, purchased), the time and amount of
-- the next expiry of a live extra grant (-1 and 0: none), then feature and
-- used pairs. pa, pm and pr are -1 when no plan is waiting.
local function reply(acc, head)
  if not acc.used then error('reply needs the account loaded with its usage') end
  need_cold(acc)
  local out = head or {}
  local sums = {[PROMOTIONAL] = {0, 0}, [ROLLOVER] = {0, 0}, [PURCHASED] = {0, 0}}
  local nxe, nxa = -1, 0
  all_full(acc)
  for _, g in ipairs(order_grants(acc)) do
    if grant_live(g) then
      local k = sums[g.kind]
      k[1], k[2] = k[1] + g.rem, k[2] + g.held
      if g.exp > 0 and (nxe < 0 or g.exp <= nxe) then
        if g.exp ~= nxe then nxa = 0 end
        nxe, nxa = g.exp, nxa + g.rem
      end
    end
  end
  local pr = -1
  need_gs(acc)
  if acc.pa then pr = acc.pr or 0 end
  local fields = {acc.rem, acc.pur, acc.a, acc.m, acc.pa or -1, acc.pm or -1, acc.own, acc.ps, acc.nx,
    acc.ha, acc.ho, acc.hp, acc.ro, pr, acc.hq, sums[PROMOTIONAL][1], sums[PROMOTIONAL][2], sums[ROLLOVER][1],
    sums[ROLLOVER][2], sums[PURCHASED][1], sums[PURCHASED][2], nxe, nxa}
  for _, v in ipairs(fields) do table.insert(out, v) end
  for f, n in pairs(acc.used) do
    table.insert(out, f)
    table.insert(out, n)
  end
  return out
end
