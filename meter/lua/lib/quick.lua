-- A call's charge, as far as its quick way goes: its request marker, then,
-- for what most charges are, the charge itself without the account's
-- tables. The full way (lib/calls.lua, charge_full) is built only by a run
-- that needs it: a script's top level builds every function it defines at
-- each run, and the full way's take far longer to build than the quick
-- way's run.

--#include lib/fields.lua
--#include lib/marker.lua

-- Whether a charge may take its quick way (quick_charge). The ledger's
-- tests run the charge scripts with it off too, and check that both ways
-- leave Redis the same.
local QUICK = true

-- A charge's quick way, for what most charges are: an org that exists, with
-- no live holds, no recharge due, and no budget to count against, whose
-- cost the first of its grants in burn-down order pays whole (or, with no
-- grants but this period's allowance and the standing purchased grant,
-- those two and debt), without ending it. It reads and writes what the
-- full way would (load, grant_times, take, commit, write_marker), without
-- building the account's tables. Returns the charge's reply; or nil, having
-- written nothing, and the account's read (for load) when the charge needs
-- the full way.
local function quick_charge(account_key, marker_key, calls_key, feature, cost, overdraft, limit, request_id, attempt,
                            bind, ttl)
  local day = today() .. ':' .. feature
  local raw = redis.call('HMGET', account_key, 'u:' .. feature, day, unpack(READ))
  -- raw: u:<feature>, <day>:<feature>, then READ: rem, pur, nx, pn, seq,
  -- ha, ho, hp, hx, gl.
  if not raw[3] or not raw[5] or raw[8] or raw[9] or raw[10] or raw[11] then return nil, raw end
  local used, on_day = tonumber(raw[1] or 0), tonumber(raw[2] or 0)
  local rem, pur, nx = tonumber(raw[3]), tonumber(raw[4] or 0), tonumber(raw[5])
  local pn, seq = tonumber(raw[6] or 0), tonumber(raw[7] or 0)
  if not (used and on_day and rem and pur and nx and pn and seq) or nx <= now_ym then return nil, raw end

  -- gl (see account.lua): the head of the order pays, or the full way does.
  local gl, gf, gh, gx, hq, gid, grem, tail = raw[12], 0, 0, 0, 0, nil, 0, ''
  if gl then
    local sgf, sgh, sgx, shq, head
    sgf, sgh, sgx, shq, head, tail = string.match(gl, '^(%d+) (%d+) (%d+) (%d+)|(%S+)(.*)$')
    if not sgf or cost <= 0 then return nil, raw end
    gf, gh, gx, hq = tonumber(sgf), tonumber(sgh), tonumber(sgx), tonumber(shq)
    if gx ~= 0 and gx * 1000 <= srv_now() then return nil, raw end
    if head == 'a' then
      if rem < cost then return nil, raw end
    else
      -- A grant live holds took from has "id:rem:held" (and holds mean hx),
      -- a pending one "id:remp"; and a grant this charge spends ends: the
      -- full way does those.
      local id, r = string.match(head, '^(%d+):(%d+)$')
      if not id then return nil, raw end
      gid, grem = id, tonumber(r)
      if grem <= cost then return nil, raw end
    end
  end

  local free = rem + pur + gf
  if (not overdraft and free < cost) or (overdraft and limit >= 0 and free - cost < -limit) then
    return {REFUSED, free + gh + hq, 0}
  end
  local fa, fp, fd = 0, 0, 0
  if gid then
    gf, grem = gf - cost, grem - cost
  else
    -- The allowance first, then purchased credits, then debt.
    fa = math.min(cost, math.max(rem, 0))
    fp = math.min(cost - fa, math.max(pur, 0))
    fd = cost - fa - fp
  end
  rem, pur, seq = rem - fa - fd, pur - fp, seq + 1
  local bal = rem + pur + gf + gh + hq

  -- commit: the call log first (its first write checks its type), then
  -- the account's changed fields.
  local line = string.format('%d charge %d %d %s %s %d', seq, -cost, bal, feature, request_id, now_ms)
  local len = redis.pcall('LPUSH', calls_key, line)
  if type(len) == 'table' then
    if string.sub(len.err, 1, 9) ~= 'WRONGTYPE' then error(len) end
    return {WRONG_TYPE, 3, redis.call('TYPE', calls_key)['ok']}
  end
  if len > tonumber(events_max) then
    redis.call('LTRIM', calls_key, 0, tonumber(events_max) - 1)
  end
  redis.call('EXPIRE', calls_key, calls_ttl)
  local set, n = {'seq', str(seq)}, 2
  if fa + fd ~= 0 then
    set[n + 1], set[n + 2], n = 'rem', str(rem), n + 2
  end
  if fp ~= 0 and pur ~= 0 then
    set[n + 1], set[n + 2], n = 'pur', str(pur), n + 2
  end
  local g = nil
  if gid then
    set[n + 1], set[n + 2], n = 'gl', string.format('%d %d %d %d|%s:%d%s', gf, gh, gx, hq, gid, grem, tail), n + 2
    g = {[gid] = cost}
  end
  if cost ~= 0 then
    set[n + 1], set[n + 2], set[n + 3], set[n + 4] = 'u:' .. feature, str(used + cost), day, str(on_day + cost)
  end
  redis.call('HSET', account_key, unpack(set))
  if fp ~= 0 and pur == 0 then redis.call('HDEL', account_key, 'pur') end
  if cost ~= 0 and on_day == 0 then prune_days(account_key) end

  write_marker(marker_key, {cost = cost, feature = feature, fa = fa, fp = fp, fd = fd, balance = bal, state = CHARGED,
    pn = pn, attempt = attempt, relied = '0', bind = bind, g = g}, ttl)
  return {OK, bal, cost}
end

-- A call's charge, up to its full way: KEYS[k + 1 .. k + 6] and
-- ARGV[a + 1 .. a + 10] are charge.lua's KEYS and ARGV[8..17]. Returns the
-- charge's reply; or nil, having written nothing, and the charge as read
-- (its keys and arguments, its marker's lifetime, and read: the account's
-- read, nil when it made none) when the charge needs the full way.
local function charge_start(k, a)
  -- Every key but the call log fails its first read, before any write,
  -- when it holds another type; the call log is the first key written, and
  -- commit stops there when it is not a list.
  local account_key, marker_key, calls_key, holds_key, kept_key, budgets_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
    KEYS[k + 4], KEYS[k + 5], KEYS[k + 6]
  local feature = ARGV[a + 1]
  local cost = tonumber(ARGV[a + 2])
  local overdraft = ARGV[a + 3] == '1'
  local limit = tonumber(ARGV[a + 4])
  local request_id = ARGV[a + 5]
  local marker_ttl = ARGV[a + 6]
  local attempt = ARGV[a + 7]
  local bind = ARGV[a + 8]
  local in_flight_ttl = ARGV[a + 9]
  local subject = ARGV[a + 10]

  local m = parse_marker(redis.call('GET', marker_key))
  if m and m.attempt == attempt then
    if m.state == VOID then return {VOIDED, 0, 0} end
    return {OK, m.balance, m.cost}
  end
  if m and not marker_free(m) then
    if m.bind ~= bind then
      return {MISMATCH, m.balance, 0}
    end
    if (m.state == CHARGED or m.state == SETTLED) and bind ~= '-' then
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

  local ttl = marker_ttl
  if bind ~= '-' then ttl = in_flight_ttl end
  local read = nil
  if QUICK and subject == '-' then
    local r
    r, read = quick_charge(account_key, marker_key, calls_key, feature, cost, overdraft, limit, request_id, attempt,
      bind, ttl)
    if r then return r end
  end
  return nil, {account_key = account_key, marker_key = marker_key, calls_key = calls_key, holds_key = holds_key,
    budgets_key = budgets_key, feature = feature, cost = cost, overdraft = overdraft, limit = limit,
    request_id = request_id, attempt = attempt, bind = bind, subject = subject, ttl = ttl, read = read}
end
