-- Shared head of every script; the script's own body follows it.
--
-- ARGV[1] now, unix milliseconds (the caller's clock: periods follow it)
-- ARGV[2] now as a month index: year*12 + month - 1, UTC
-- ARGV[3] default plan allowance, for an org seen for the first time
-- ARGV[4] default plan recharge month, 1..12
-- ARGV[5] the most events the org's event list keeps
-- ARGV[6] milliseconds added to Redis' clock (0 but in the ledger's tests)
-- ARGV[7] seconds a call's events are kept after the org's last call
--
-- The account hash holds: a (allowance), m (recharge month), pa and pm (a plan
-- waiting for the next recharge), own (1 when the org has a plan of its own),
-- rem (free allowance: not held; below zero is debt), pur (free purchased
-- credits), ps (period start, unix seconds), nx (next recharge as a month
-- index), pn (the period's number: one more at each new period), cd (the
-- debt carried into this period that no refund has cancelled yet), seq (the
-- number of the org's last event), ha, ho and hp (credits
-- live holds keep: of this period's allowance, of an ended period's
-- allowance, of purchased credits), hx (the earliest expiry of a live hold,
-- Redis time in ms), u:<feature> (credits used by a feature this period)
-- and <yyyymmdd>:<feature> (credits used by a feature on a UTC day, net of
-- refunds, kept 13 months; the only fields that start with a digit).
--
-- balance = rem + pur + ha + ho + hp; available = rem + pur.
--
-- Nothing is written until the script's checks are done: every key's type is
-- checked first (check_types; a charge, whose keys but its call log fail
-- their first read when they hold another type, checks the call log as it
-- first writes to it: see commit), and a script that refuses writes nothing.

local now_ms = tonumber(ARGV[1])
local now_ym = tonumber(ARGV[2])
local def_allowance = tonumber(ARGV[3])
local def_month = tonumber(ARGV[4])
local events_max = ARGV[5]
local calls_ttl = ARGV[7]

-- Holds expire by Redis' clock, so no gateway's clock can end another's.
-- It is read once, when a script first needs it: most charges never do.
local srv_ms
local function srv_now()
  if not srv_ms then
    local t = redis.call('TIME')
    srv_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6])
  end
  return srv_ms
end

-- Return codes, as in Go (scripts.go).
local OK, REFUSED, REPEAT, NOT_FOUND, LIMIT, VOIDED, WRONG_TYPE, ENDED, IN_FLIGHT, MISMATCH, LEASE =
  0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

-- How long a hold's record stays once it is captured, released or expired:
-- a repeated capture answers the same, a late capture of an expired hold is
-- still charged, and a lease's last sync number stays known.
local HOLD_KEPT_MS = 86400000

-- Checks each key against the type the script uses it as ('none' is always
-- fine: the key is new): types[i] is KEYS[i]'s. Returns nil, or the reply
-- that names the key by i.
local function check_types(types)
  for i, want in ipairs(types) do
    local got = redis.call('TYPE', KEYS[i])['ok']
    if got ~= 'none' and got ~= want and not (type(want) == 'table' and (want[1] == got or want[2] == got)) then
      return {WRONG_TYPE, i, got}
    end
  end
  return nil
end

-- Integers as decimal text: a plain tostring may print large ones as 1e+15.
local function str(n)
  return string.format('%d', n)
end

-- Unix seconds of 00:00 UTC on the first day of the month index ym.
local function ym_unix(ym)
  local y = math.floor(ym / 12)
  local m = ym % 12 + 1
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return (era * 146097 + doe - 719468) * 86400
end

-- The UTC day of now_ms as yyyymmdd, and the first day still kept of the
-- usage per day: the first of the month 13 months before this one.
local today_s
local function today()
  if not today_s then
    local z = math.floor(now_ms / 86400000) + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local d = doy - math.floor((153 * mp + 2) / 5) + 1
    local m = mp + 3
    if mp >= 10 then m = mp - 9 end
    local y = yoe + era * 400
    if m <= 2 then y = y + 1 end
    today_s = string.format('%04d%02d%02d', y, m, d)
  end
  return today_s
end

local function days_kept_from()
  local ym = now_ym - 13
  return string.format('%04d%02d01', math.floor(ym / 12), ym % 12 + 1)
end

-- The first month index after ym that falls in calendar month `month`.
local function next_after(ym, month)
  local n = ym - ym % 12 + month - 1
  if n <= ym then n = n + 12 end
  return n
end

-- The account hash's fields but u:<feature> and <yyyymmdd>:<feature>, and the
-- value each reads as when it is absent (nil: no default; a, rem and nx
-- must be there; ps, absent, is the start of the plan year that ends at nx).
-- A field at its default is not written: an idle org's hash holds what
-- tells it apart, and no more.
local FIELDS = {'a', 'm', 'own', 'rem', 'pur', 'ps', 'nx', 'pn', 'cd', 'seq', 'ha', 'ho', 'hp', 'hx', 'pa', 'pm'}
local DEFAULTS = {m = 1, own = 0, pur = 0, pn = 0, cd = 0, seq = 0, ha = 0, ho = 0, hp = 0}
local REQUIRED = {'a', 'rem', 'nx'}

local function held(acc)
  return acc.ha + acc.ho + acc.hp
end

local function balance(acc)
  return acc.rem + acc.pur + held(acc)
end

local function available(acc)
  return acc.rem + acc.pur
end

local function event(acc, kind, delta, feature, ref, at_ms, reason)
  table.insert(acc.events, {kind, delta, balance(acc), feature or '', ref or '', at_ms or now_ms, reason})
end

-- Starts a new period at period start ps_unix, granting the plan's allowance.
-- Unused allowance expires and debt carries over. Allowance that live holds
-- keep stays theirs, as allowance of an ended period.
local function start_period(acc, ps_unix, next_ym)
  if acc.pa then
    acc.a, acc.m, acc.pa, acc.pm = acc.pa, acc.pm, nil, nil
  end
  acc.cd = math.max(-acc.rem, 0)
  acc.rem = acc.a + math.min(acc.rem, 0)
  acc.ho, acc.ha = acc.ho + acc.ha, 0
  acc.pn = (acc.pn or 0) + 1
  acc.ps = ps_unix
  acc.nx = next_ym or next_after(now_ym, acc.m)
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
  local acc = {a = allowance, m = month, own = 0, rem = 0, pur = 0, ha = 0, ho = 0, hp = 0, seq = 0, pn = -1,
    used = {}, used_delta = {}, day_delta = {}, events = {}, created = true, stored = {}}
  start_period(acc, ym_unix(now_ym - ((now_ym % 12) - (month - 1)) % 12), next_after(now_ym, month))
  return acc
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

-- Whether an account field is a day's usage: <yyyymmdd>:<feature>.
local function is_day(f)
  local c = string.byte(f, 1)
  return c ~= nil and c >= 48 and c <= 57
end

-- Loads the account at key, or nil when Redis holds nothing for it. A field
-- that is not a number is an error, raised before any write. With
-- with_used, acc.used holds every feature's usage this period (reply needs
-- it); without, usage is only added to (add_used) or read one feature at a
-- time (used_of), which keeps a charge from reading every feature's field.
-- acc.stored keeps the fields as the hash holds them (nil when absent), so
-- commit writes only what changed. feature, without with_used, is a
-- charge's: its usage this period and today is read with the other fields
-- (acc.known), and commit sets it in the same HSET as the rest, where it
-- would add to each with an HINCRBY of its own.
local function load(key, with_used, feature)
  local acc = {key = key, events = {}, used_delta = {}, day_delta = {}, stored = {}}
  local stored = acc.stored
  if with_used then
    local raw = redis.call('HGETALL', key)
    if #raw == 0 then return nil end
    acc.used = {}
    for i = 1, #raw, 2 do
      local f = raw[i]
      local n = field_number(f, raw[i + 1])
      if string.sub(f, 1, 2) == 'u:' then
        acc.used[string.sub(f, 3)] = n
      elseif not is_day(f) then
        stored[f] = n
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
    local nf, raw = 0, nil
    if feature then
      nf = 2
      raw = redis.call('HMGET', key, 'u:' .. feature, today() .. ':' .. feature, unpack(FIELDS))
    else
      raw = redis.call('HMGET', key, unpack(FIELDS))
    end
    for i = 1, #FIELDS do
      local f = FIELDS[i]
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
      acc.known = {['u:' .. feature] = field_number('u:' .. feature, raw[1] or 0),
        [today() .. ':' .. feature] = field_number(today() .. ':' .. feature, raw[2] or 0)}
    end
    if not stored.a and not stored.rem and redis.call('EXISTS', key) == 0 then
      return nil
    end
  end
  for _, f in ipairs(REQUIRED) do
    if not stored[f] then
      error('account field ' .. f .. ' is missing')
    end
  end
  if not acc.ps then acc.ps = ym_unix(acc.nx - 12) end
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

-- Takes n credits of the available balance: allowance first, then purchased
-- credits, then (only where the caller allows it) debt. Returns the parts
-- taken: {fa = allowance, fp = purchased, fd = debt, pn = this period}.
local function take(acc, n)
  local fa = math.min(n, math.max(acc.rem, 0))
  local fp = math.min(n - fa, math.max(acc.pur, 0))
  local fd = n - fa - fp
  acc.rem = acc.rem - fa - fd
  acc.pur = acc.pur - fp
  return {fa = fa, fp = fp, fd = fd, pn = acc.pn}
end

-- Adds parts q to parts p (the same period's).
local function add_parts(p, q)
  p.fa, p.fp, p.fd = p.fa + q.fa, p.fp + q.fp, p.fd + q.fd
end

-- Gives back up to n of the credits a charge took (its parts p, which shrink
-- by what is given back), in the reverse of the order they were taken: debt,
-- purchased credits, allowance. Purchased credits go back to purchased, and
-- never more than were taken. Allowance taken in a period that has ended is
-- not given back: it expired with its period. Debt is cancelled: this
-- period's at once; an ended period's only as far as it was carried into
-- this one and no refund has cancelled it yet (acc.cd), so a refund never
-- lifts the allowance above the plan. Returns the change to the balance.
local function give_back(acc, p, n)
  local back = 0
  local d = math.min(n, p.fd)
  p.fd, n = p.fd - d, n - d
  if p.pn ~= acc.pn then
    d = math.min(d, acc.cd)
    acc.cd = acc.cd - d
  end
  acc.rem, back = acc.rem + d, back + d
  local f = math.min(n, p.fp)
  p.fp, n = p.fp - f, n - f
  acc.pur, back = acc.pur + f, back + f
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

-- Drops the usage of days older than the 13 months kept.
local function prune_days(key)
  local from = days_kept_from()
  local old = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if is_day(f) and string.sub(f, 1, 8) < from then
      table.insert(old, f)
    end
  end
  if #old > 0 then redis.call('HDEL', key, unpack(old)) end
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
  local set, gone = {}, {}
  local stored = acc.stored
  for i = 1, #FIELDS do
    local f = FIELDS[i]
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
-- hp, then feature and used pairs. pa and pm are -1 when no plan is waiting.
local function reply(acc, head)
  if not acc.used then error('reply needs the account loaded with its usage') end
  local out = head or {}
  local fields = {acc.rem, acc.pur, acc.a, acc.m, acc.pa or -1, acc.pm or -1, acc.own, acc.ps, acc.nx,
    acc.ha, acc.ho, acc.hp}
  for _, v in ipairs(fields) do table.insert(out, v) end
  for f, n in pairs(acc.used) do
    table.insert(out, f)
    table.insert(out, n)
  end
  return out
end

-- A request's marker: what a charge took and where it stands. fa, fp and fd
-- are the parts of its cost taken from allowance, purchased credits and
-- debt, in period number pn; state is c (charged: the call is in flight), u
-- (settled to the upstream's usage), d (done: its response is kept, or was
-- too large to keep), r (refunded: the request id is free again) or x (void:
-- a charge that must not happen; the request id is free again). The earlier
-- layout's s is u, or r when its cost is 0; attempt is the id of the gateway's
-- attempt that charged (or voided) it; relied is 1 once another attempt with
-- the same request id was answered as a replay of this charge, so the
-- charge must stand; bind is what the first call's method, path, feature and
-- cost hash to ('-' for a call without an Idempotency-Key); day is the UTC
-- day it was charged (yyyymmdd), whose usage its settle or refund changes.
-- A marker without day is read as charged today. A marker of the earlier
-- layout (without fa and fd, and with the period's start where pn stands)
-- is read as having no debt; marker_period then finds its period.
local function parse_marker(s)
  if not s then return nil end
  local cost, feature, fa, fp, fd, bal, state, pn, attempt, relied, bind =
    string.match(s, '^(%-?%d+) (%S+) (%d+) (%d+) (%d+) (%-?%d+) (%a) (%-?%d+) (%S+) ([01]) (%S+)$')
  local day
  if not cost then
    cost, feature, fa, fp, fd, bal, state, pn, attempt, relied, bind, day = string.match(s,
      '^(%-?%d+) (%S+) (%d+) (%d+) (%d+) (%-?%d+) (%a) (%-?%d+) (%S+) ([01]) (%S+) (%d%d%d%d%d%d%d%d)$')
  end
  if not cost then
    local ps
    cost, feature, fp, bal, state, ps, attempt, relied =
      string.match(s, '^(%-?%d+) (%S+) (%d+) (%-?%d+) (%a) (%-?%d+) (%S+) ([01])$')
    if not cost then
      error('corrupt request marker')
    end
    fa, fd = math.max(tonumber(cost) - tonumber(fp), 0), 0
    return {cost = tonumber(cost), feature = feature, fa = fa, fp = tonumber(fp), fd = fd,
      balance = tonumber(bal), state = state, legacy_ps = tonumber(ps), attempt = attempt, relied = relied,
      bind = '-'}
  end
  return {cost = tonumber(cost), feature = feature, fa = tonumber(fa), fp = tonumber(fp), fd = tonumber(fd),
    balance = tonumber(bal), state = state, pn = tonumber(pn), attempt = attempt, relied = relied, bind = bind,
    day = day}
end

-- Sets the period of a marker of the earlier layout: this one if it started
-- when the marker's did.
local function marker_period(m, acc)
  if m.legacy_ps then
    if m.legacy_ps == acc.ps then m.pn = acc.pn else m.pn = -1 end
    m.legacy_ps = nil
  end
end

local function write_marker(key, m, ttl)
  local v = string.format('%d %s %d %d %d %d %s %d %s %s %s %s', m.cost, m.feature, m.fa, m.fp, m.fd, m.balance,
    m.state, m.pn, m.attempt, m.relied, m.bind or '-', m.day or today())
  if ttl then
    redis.call('SET', key, v, 'EX', ttl)
  else
    redis.call('SET', key, v, 'KEEPTTL')
  end
end

-- Whether a marker leaves its request id free for a new charge.
local function marker_free(m)
  return m.state == 'x' or m.state == 'r' or (m.state == 's' and m.cost == 0)
end

-- Sets a charged request's final cost: refunded (the call failed; its id is
-- free again) or settled to its usage. Returns the change to the balance.
local function settle_to(acc, m, actual, ref, refund)
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
  if diff ~= 0 then
    local kind = 'settle'
    if refund then kind = 'refund' end
    event(acc, kind, balance(acc) - before, m.feature, ref)
  end
  m.cost, m.balance = actual, balance(acc)
  if refund then m.state = 'r' else m.state = 'u' end
  return balance(acc) - before
end

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
  local st, ofa, fa, fp, pn, untl, seq, cap, cfa, cfp, cfd, feature, rep = string.match(s,
    '^(%a) (%d+) (%d+) (%d+) (%-?%d+) (%d+) (%d+) (%-?%d+) (%d+) (%d+) (%d+) (%S+) ?(%d*)$')
  if not st then
    error('corrupt hold record')
  end
  local h = {state = st, ofa = tonumber(ofa), fa = tonumber(fa), fp = tonumber(fp), pn = tonumber(pn),
    untl = tonumber(untl), seq = tonumber(seq), cap = tonumber(cap), cfa = tonumber(cfa),
    cfp = tonumber(cfp), cfd = tonumber(cfd), feature = feature, rep = tonumber(rep) or 0}
  -- A period ended since the record was written: the allowance it keeps is
  -- an ended period's, and what it captured is no longer given back but for
  -- purchased credits (a lease's captures are not told apart by period).
  if h.pn ~= acc.pn then
    h.ofa, h.fa, h.cfa, h.cfd, h.pn = h.ofa + h.fa, 0, 0, 0, acc.pn
  end
  return h
end

local function hold_str(h)
  local s = table.concat({h.state, str(h.ofa), str(h.fa), str(h.fp), str(h.pn), str(h.untl), str(h.seq),
    str(h.cap), str(h.cfa), str(h.cfp), str(h.cfd), h.feature}, ' ')
  if h.rep > 0 then s = s .. ' ' .. str(h.rep) end
  return s
end

local function hold_amount(h)
  return h.ofa + h.fa + h.fp
end

local function new_hold(acc, feature)
  return {state = RELEASED, ofa = 0, fa = 0, fp = 0, pn = acc.pn, untl = 0, seq = 0, cap = 0, cfa = 0, cfp = 0,
    cfd = 0, feature = feature or '-', rep = 0}
end

-- Sets n more credits of the available balance aside in hold h.
local function hold_more(acc, h, n)
  local p = take(acc, n)
  h.fa, h.fp = h.fa + p.fa, h.fp + p.fp
  acc.ha, acc.hp = acc.ha + p.fa, acc.hp + p.fp
end

-- Gives back up to n of what hold h keeps, to the buckets it came from: this
-- period's allowance and purchased credits go back to be spent again, an
-- ended period's allowance is gone with its period. Returns the change to
-- the balance.
local function hold_less(acc, h, n)
  local before = balance(acc)
  local o = math.min(n, h.ofa)
  h.ofa, acc.ho, n = h.ofa - o, acc.ho - o, n - o
  local f = math.min(n, h.fp)
  h.fp, acc.hp, acc.pur, n = h.fp - f, acc.hp - f, acc.pur + f, n - f
  local a = math.min(n, h.fa)
  h.fa, acc.ha, acc.rem = h.fa - a, acc.ha - a, acc.rem + a
  return balance(acc) - before
end

-- Charges n credits from hold h: what it keeps first (an ended period's
-- allowance, then this period's, then purchased credits), then, for usage
-- above the hold, the available balance, into debt if it must. Returns the
-- change to the balance.
local function hold_capture(acc, h, n)
  local before = balance(acc)
  local o = math.min(n, h.ofa)
  h.ofa, acc.ho, n = h.ofa - o, acc.ho - o, n - o
  local a = math.min(n, h.fa)
  h.fa, acc.ha, h.cfa, n = h.fa - a, acc.ha - a, h.cfa + a, n - a
  local f = math.min(n, h.fp)
  h.fp, acc.hp, h.cfp, n = h.fp - f, acc.hp - f, h.cfp + f, n - f
  if n > 0 then
    local p = take(acc, n)
    h.cfa, h.cfp, h.cfd = h.cfa + p.fa, h.cfp + p.fp, h.cfd + p.fd
  end
  return balance(acc) - before
end

-- Gives back up to n credits that hold h captured (a lease's call refunded
-- after its spending was reported), as give_back does for a charge.
local function hold_refund(acc, h, n)
  local p = {fa = h.cfa, fp = h.cfp, fd = h.cfd, pn = acc.pn}
  local back = give_back(acc, p, n)
  h.cfa, h.cfp, h.cfd = p.fa, p.fp, p.fd
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

-- Top-up references: a sorted set scored by when each may be forgotten (a
-- set of the earlier layout, kept forever, is read as it is and moved into
-- the sorted set by refs_move before the first write).
local function ref_seen(key, ref)
  if redis.call('TYPE', key)['ok'] == 'set' then
    return redis.call('SISMEMBER', key, ref) == 1
  end
  local until_ms = redis.call('ZSCORE', key, ref)
  return until_ms and tonumber(until_ms) > srv_now()
end

local function refs_move(key, forget)
  if redis.call('TYPE', key)['ok'] ~= 'set' then return end
  local old = redis.call('SMEMBERS', key)
  redis.call('DEL', key)
  for _, r in ipairs(old) do
    redis.call('ZADD', key, forget, r)
  end
end

-- Records ref as applied, to be forgotten ref_kept ms from now, and forgets
-- the references past their time.
local function remember_ref(key, ref, ref_kept)
  local forget = str(srv_now() + ref_kept)
  refs_move(key, forget)
  redis.call('ZADD', key, forget, ref)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', str(srv_now()))
  redis.call('PEXPIRE', key, ref_kept)
end

-- The account hash at key as a list of its fields and values, in the
-- order of the fields' names: two images are equal when the hashes are.
local function account_image(key)
  local raw = redis.call('HGETALL', key)
  local names, values = {}, {}
  for i = 1, #raw, 2 do
    names[#names + 1] = raw[i]
    values[raw[i]] = raw[i + 1]
  end
  table.sort(names)
  local out = {}
  for _, f in ipairs(names) do
    out[#out + 1] = f
    out[#out + 1] = values[f]
  end
  return out
end

-- A write the gateway may have to void (a plan or a recharge of a reference
-- of its own, whose outcome it could not learn) first writes what loading
-- the account changed (a recharge due, an expired hold), so that the image
-- of the account it keeps is the account as the write found it. Returns
-- the account, loaded again, and that image.
local function image_before(account_key, events_key, holds_key, acc)
  commit(account_key, events_key, acc)
  write_holds(holds_key, acc)
  acc = load(account_key, true)
  return acc, account_image(account_key)
end

-- Keeps the account's images before and after a write at key, for ms
-- milliseconds: its void puts the first back while the account is still
-- the second.
local function keep_images(key, account_key, before, ms)
  redis.call('SET', key, cjson.encode({before, account_image(account_key)}), 'PX', ms)
end

-- The balance rose: the balance alerts below it are armed again. The
-- balance of the org's last alert check (alert.lua) is raised to it, never
-- lowered, so a fall that no check has seen yet is still alerted.
local function rearm_alerts(key, acc)
  if redis.call('EXISTS', key) == 0 then return end
  local last = tonumber(redis.call('HGET', key, 'l'))
  if not last or last < balance(acc) then
    redis.call('HSET', key, 'l', str(balance(acc)))
  end
end

-- A call's charge: KEYS[k + 1 .. k + 5] and ARGV[a + 1 .. a + 9] are
-- charge.lua's KEYS and ARGV[8..16] (charge.lua runs charge(0, 7); a batch
-- of charges, charges.lua, one after another).
local function charge(k, a)
  -- Every key but the call log fails its first read, before any write,
  -- when it holds another type; the call log is the first key written, and
  -- commit stops there when it is not a list.
  local account_key, marker_key, events_key, holds_key, kept_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
    KEYS[k + 5]
  local feature = ARGV[a + 1]
  local cost = tonumber(ARGV[a + 2])
  local overdraft = ARGV[a + 3] == '1'
  local limit = tonumber(ARGV[a + 4])
  local request_id = ARGV[a + 5]
  local marker_ttl = ARGV[a + 6]
  local attempt = ARGV[a + 7]
  local bind = ARGV[a + 8]
  local in_flight_ttl = ARGV[a + 9]

  local m = parse_marker(redis.call('GET', marker_key))
  if m and m.attempt == attempt then
    if m.state == 'x' then return {VOIDED, 0, 0} end
    return {OK, m.balance, m.cost}
  end
  if m and not marker_free(m) then
    if m.bind ~= bind then
      return {MISMATCH, m.balance, 0}
    end
    if (m.state == 'c' or m.state == 'u') and bind ~= '-' then
      return {IN_FLIGHT, m.balance, 0}
    end
    if m.relied ~= '1' then
      m.relied = '1'
      write_marker(marker_key, m)
    end
    local kept = false
    if bind ~= '-' then kept = redis.call('GET', kept_key) end
    return {REPEAT, m.balance, m.cost, kept}
  end

  local acc = load(account_key, false, feature)
  local fresh = not acc
  if fresh then
    acc = new_account(def_allowance, def_month)
  end
  sweep(acc, holds_key)
  local free = available(acc)
  if (not overdraft and free < cost) or (overdraft and limit >= 0 and free - cost < -limit) then
    return {REFUSED, balance(acc), 0}
  end

  if fresh then
    event(acc, 'grant', acc.rem, '', 'default-plan')
  end
  local p = take(acc, cost)
  add_used(acc, feature, cost)
  event(acc, 'charge', -cost, feature, request_id)
  local bad = commit(account_key, events_key, acc, true)
  if bad then return {WRONG_TYPE, 3, bad} end
  if acc.swept then write_holds(holds_key, acc) end
  local ttl = marker_ttl
  if bind ~= '-' then ttl = in_flight_ttl end
  write_marker(marker_key, {cost = cost, feature = feature, fa = p.fa, fp = p.fp, fd = p.fd,
    balance = balance(acc), state = 'c', pn = acc.pn, attempt = attempt, relied = '0', bind = bind}, ttl)
  return {OK, balance(acc), cost}
end
