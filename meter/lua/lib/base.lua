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
local OK, REFUSED, REPEAT, NOT_FOUND, LIMIT, VOIDED, WRONG_TYPE, ENDED, IN_FLIGHT, MISMATCH, LEASE, FULL, BUDGET =
  0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12

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

-- The UTC day number d (days since 1970-01-01) as yyyymmdd.
local function ymd(d)
  local z = d + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local dd = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d%02d%02d', y, m, dd)
end

-- The UTC day of now_ms as yyyymmdd, and the first day still kept of the
-- usage per day: the first of the month 13 months before this one.
local today_s
local function today()
  if not today_s then today_s = ymd(math.floor(now_ms / 86400000)) end
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

-- Credits per grant id, {[id] = n}, as text: "id=n,id=n" ('' for none).
local function parts_str(g)
  if not g then return '' end
  local id, n = next(g)
  if id ~= nil and next(g, id) == nil then
    -- One grant, as most charges take from: no sorting.
    if n > 0 then return id .. '=' .. string.format('%d', n) end
    return ''
  end
  local out = {}
  for id, n in pairs(g or {}) do
    if n > 0 then out[#out + 1] = id .. '=' .. string.format('%d', n) end
  end
  table.sort(out)
  return table.concat(out, ',')
end

-- The parts parts_str wrote; an error when they are not that.
local function parse_parts(s)
  local g = {}
  for id, n in string.gmatch(s, '(%d+)=(%d+)') do
    g[id] = tonumber(n)
  end
  if parts_str(g) ~= s then error('corrupt grant parts') end
  return g
end
