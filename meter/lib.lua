-- Shared head of every script; the script's own body follows it.
--
-- ARGV[1] now, unix milliseconds (the caller's clock, so tests can move time)
-- ARGV[2] now as a month index: year*12 + month - 1, UTC
-- ARGV[3] default plan allowance, for an org seen for the first time
-- ARGV[4] default plan recharge month, 1..12
-- ARGV[5] the most events the org's event list keeps
--
-- The account hash holds: a (allowance), m (recharge month), pa and pm (a plan
-- waiting for the next recharge), own (1 when the org has a plan of its own),
-- rem (allowance remaining; below zero is debt), pur (purchased credits),
-- ps (period start, unix seconds), nx (next recharge as a month index), seq
-- (the number of the org's last event) and u:<feature> (credits used by a
-- feature this period).
--
-- Nothing is written until commit(), so a script that refuses writes nothing.

local now_ms = tonumber(ARGV[1])
local now_ym = tonumber(ARGV[2])
local def_allowance = tonumber(ARGV[3])
local def_month = tonumber(ARGV[4])
local events_max = ARGV[5]

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

-- The first month index after ym that falls in calendar month `month`.
local function next_after(ym, month)
  local n = ym - ym % 12 + month - 1
  if n <= ym then n = n + 12 end
  return n
end

local function balance(acc)
  return acc.rem + acc.pur
end

local function event(acc, kind, delta, feature, ref, at_ms)
  table.insert(acc.events, {kind, delta, balance(acc), feature or '', ref or '', at_ms or now_ms})
end

-- Starts a new period at period start ps_unix, granting the plan's allowance.
-- Unused allowance expires and debt carries over.
local function start_period(acc, ps_unix, next_ym)
  if acc.pa then
    acc.a, acc.m, acc.pa, acc.pm = acc.pa, acc.pm, nil, nil
    acc.plan_dirty = true
  end
  acc.rem = acc.a + math.min(acc.rem, 0)
  acc.ps = ps_unix
  acc.nx = next_ym or next_after(now_ym, acc.m)
  acc.used = {}
  acc.reset_used = true
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

local function new_account(allowance, month)
  local acc = {a = allowance, m = month, own = 0, rem = 0, pur = 0, used = {}, events = {}, created = true}
  start_period(acc, ym_unix(now_ym - ((now_ym % 12) - (month - 1)) % 12), next_after(now_ym, month))
  return acc
end

-- Loads the account at key, or nil when Redis holds nothing for it.
local function load(key)
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then return nil end
  local acc = {used = {}, events = {}}
  for i = 1, #raw, 2 do
    local f, v = raw[i], raw[i + 1]
    if string.sub(f, 1, 2) == 'u:' then
      acc.used[string.sub(f, 3)] = tonumber(v)
    else
      acc[f] = tonumber(v)
    end
  end
  catch_up(acc)
  return acc
end

-- Loads the account at key, creating it on the default plan when it is new.
local function open(key)
  local acc = load(key)
  if acc then return acc end
  acc = new_account(def_allowance, def_month)
  event(acc, 'grant', acc.rem, '', 'default-plan')
  return acc
end

-- Spends n credits: allowance first, then purchased credits, then debt.
-- Returns how many came out of purchased credits.
local function spend(acc, n)
  local from_allowance = math.min(n, math.max(acc.rem, 0))
  local from_purchased = math.min(n - from_allowance, math.max(acc.pur, 0))
  acc.rem = acc.rem - (n - from_purchased)
  acc.pur = acc.pur - from_purchased
  return from_purchased
end

-- Gives n credits back: to purchased credits up to what the charge took from
-- them, the rest to the allowance. Returns how many went to purchased.
local function give_back(acc, n, from_purchased)
  local to_purchased = math.min(n, from_purchased)
  acc.pur = acc.pur + to_purchased
  acc.rem = acc.rem + n - to_purchased
  return to_purchased
end

local function add_used(acc, feature, n)
  acc.used[feature] = (acc.used[feature] or 0) + n
  acc.used_dirty = acc.used_dirty or {}
  acc.used_dirty[feature] = true
end

-- Writes the account and its events.
local function commit(key, events_key, acc)
  if acc.reset_used and not acc.created then
    local fields = redis.call('HKEYS', key)
    for _, f in ipairs(fields) do
      if string.sub(f, 1, 2) == 'u:' then redis.call('HDEL', key, f) end
    end
  end
  redis.call('HSET', key, 'a', str(acc.a), 'm', str(acc.m), 'own', str(acc.own),
    'rem', str(acc.rem), 'pur', str(acc.pur), 'ps', str(acc.ps), 'nx', str(acc.nx))
  if acc.pa then
    redis.call('HSET', key, 'pa', str(acc.pa), 'pm', str(acc.pm))
  elseif acc.plan_dirty then
    redis.call('HDEL', key, 'pa', 'pm')
  end
  if acc.used_dirty then
    for f in pairs(acc.used_dirty) do
      redis.call('HSET', key, 'u:' .. f, str(acc.used[f]))
    end
  end
  -- Events go to a capped list, newest first, one compact string each:
  -- "seq kind delta balance feature ref ms" ("-" for an empty field). A
  -- small list takes a few hundred bytes, where a stream takes 4 KB.
  if #acc.events > 0 then
    local seq = acc.seq or 0
    for _, e in ipairs(acc.events) do
      seq = seq + 1
      local feature, ref = e[4], e[5]
      if feature == '' then feature = '-' end
      if ref == '' then ref = '-' end
      redis.call('LPUSH', events_key, table.concat({str(seq), e[1], str(e[2]), str(e[3]), feature, ref, str(e[6])}, ' '))
    end
    redis.call('LTRIM', events_key, 0, tonumber(events_max) - 1)
    redis.call('HSET', key, 'seq', str(seq))
  end
end

-- The account as a flat reply: rem, pur, a, m, pa, pm, own, ps, nx, then
-- feature and used pairs. pa and pm are -1 when no plan is waiting.
local function reply(acc, head)
  local out = head or {}
  local fields = {acc.rem, acc.pur, acc.a, acc.m, acc.pa or -1, acc.pm or -1, acc.own, acc.ps, acc.nx}
  for _, v in ipairs(fields) do table.insert(out, v) end
  for f, n in pairs(acc.used) do
    table.insert(out, f)
    table.insert(out, n)
  end
  return out
end

-- A request's marker: what a charge took and where it stands. state is c
-- (charged), s (settled) or x (void: a charge that must not happen); attempt
-- is the id of the gateway's attempt that charged (or voided) it; relied is
-- 1 once another attempt with the same request id was answered as a replay
-- of this charge, so the charge must stand.
local function parse_marker(s)
  if not s then return nil end
  local cost, feature, fp, bal, state, ps, attempt, relied =
    string.match(s, '^(%-?%d+) (%S+) (%d+) (%-?%d+) (%a) (%-?%d+) (%S+) ([01])$')
  if not cost then
    error('corrupt request marker')
  end
  return {cost = tonumber(cost), feature = feature, from_purchased = tonumber(fp), balance = tonumber(bal),
    state = state, ps = tonumber(ps), attempt = attempt, relied = relied}
end

local function write_marker(key, m, ttl)
  local v = table.concat({str(m.cost), m.feature, str(m.from_purchased), str(m.balance), m.state,
    str(m.ps), m.attempt, m.relied}, ' ')
  if ttl then
    redis.call('SET', key, v, 'EX', ttl)
  else
    redis.call('SET', key, v, 'KEEPTTL')
  end
end

-- Sets a charged request's final cost. Returns the change to the balance.
local function settle_to(acc, m, actual, ref)
  local before = balance(acc)
  local diff = actual - m.cost
  if diff > 0 then
    m.from_purchased = m.from_purchased + spend(acc, diff)
  elseif diff < 0 then
    m.from_purchased = m.from_purchased - give_back(acc, -diff, m.from_purchased)
  end
  -- Usage of a period that has ended stays with that period.
  if diff ~= 0 and acc.ps == m.ps then
    add_used(acc, m.feature, diff)
  end
  if diff ~= 0 then
    local kind = 'settle'
    if actual == 0 then kind = 'refund' end
    event(acc, kind, balance(acc) - before, m.feature, ref)
  end
  m.cost, m.state, m.balance = actual, 's', balance(acc)
  return balance(acc) - before
end

-- Leases: a gateway may hold credits of an org's balance in reserve and
-- spend them without a call to Redis, reporting the spending later. The
-- leases hash maps a lease id to "held seq expiry_ms".
local function parse_lease(v)
  local held, seq, exp = string.match(v, '^(%d+) (%d+) (%d+)$')
  return tonumber(held), tonumber(seq), tonumber(exp)
end

-- Credits held by the leases that have not expired, except the one named.
local function reserved(key, except)
  local raw = redis.call('HGETALL', key)
  local sum = 0
  for i = 1, #raw, 2 do
    local held, _, exp = parse_lease(raw[i + 1])
    if raw[i] ~= except and exp > now_ms then sum = sum + held end
  end
  return sum
end
