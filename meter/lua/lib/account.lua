-- The account: its fields, loading it, taking and giving back credits,
-- usage, events, and writing it back.

--#include lib/base.lua

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
