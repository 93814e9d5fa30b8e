-- Request markers: what a call's charge took and where it stands.

--#include lib/base.lua

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
-- A marker's states: the earlier layout's s is read as SETTLED, or REFUNDED
-- when its cost is 0.
local CHARGED, SETTLED, DONE, REFUNDED, VOID, OLD_SETTLED = 'c', 'u', 'd', 'r', 'x', 's'

local function parse_marker(s)
  if not s then return nil end
  -- The parts taken of extra grants, " g:<parts>", end the marker when
  -- there are any.
  local gp, bp = '', nil
  s = string.gsub(s, ' g:(%S+)$', function(x) gp = x return '' end)
  -- So do the subject and window of the budget it counted against, " b:<subject>:<window>",
  -- before them.
  s = string.gsub(s, ' b:(%S+)$', function(x) bp = x return '' end)
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
    day = day, g = parse_parts(gp), b = bp}
end

local function write_marker(key, m, ttl)
  local v = string.format('%d %s %d %d %d %d %s %d %s %s %s %s', m.cost, m.feature, m.fa, m.fp, m.fd, m.balance,
    m.state, m.pn, m.attempt, m.relied, m.bind or '-', m.day or today())
  if m.b then v = v .. ' b:' .. m.b end
  local gp = parts_str(m.g)
  if gp ~= '' then v = v .. ' g:' .. gp end
  if ttl then
    redis.call('SET', key, v, 'EX', ttl)
  else
    redis.call('SET', key, v, 'KEEPTTL')
  end
end

-- Whether a marker leaves its request id free for a new charge.
local function marker_free(m)
  return m.state == VOID or m.state == REFUNDED or (m.state == OLD_SETTLED and m.cost == 0)
end
