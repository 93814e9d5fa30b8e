-- KEYS: account, leases, events. ARGV[6] lease id, ARGV[7] sync sequence
-- number, ARGV[8] credits the lease wants to hold, ARGV[9] credits the lease
-- must leave free for others, ARGV[10] the lease's lifetime in ms, ARGV[11]
-- the credits the lease held unspent when it sent the sync (it may spend
-- them while the sync is on its way), then feature and net credits spent
-- pairs since the last sync.
--
-- Charges the spending reported (one event per feature) and sets how many
-- credits the lease holds from now on: what it wants, as far as the balance
-- not held by other leases allows, and never less than what it already held
-- unspent, which it may be spending. A lease not synced within its lifetime
-- expires and holds nothing. A sequence number already applied changes
-- nothing (a repeat after a lost reply): a lease's record stays, holding 0
-- when the lease has ended, until it expires, so that a repeat is known.
-- Returns {code, held, balance}: code 0 applied, 2 a repeat.
local id = ARGV[6]
local seq = tonumber(ARGV[7])
local want = tonumber(ARGV[8])
local keep = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local unspent = tonumber(ARGV[11])

local prior = 0
local mine = redis.call('HGET', KEYS[2], id)
if mine then
  local held, last, exp = parse_lease(mine)
  if seq <= last then
    local acc = load(KEYS[1])
    return {2, held, acc and balance(acc) or 0}
  end
  if exp > now_ms then prior = held end
end

local acc = open(KEYS[1])
local spent = 0
for i = 12, #ARGV, 2 do
  local feature, n = ARGV[i], tonumber(ARGV[i + 1])
  if n > 0 then
    spend(acc, n)
    event(acc, 'charge', -n, feature, 'lease:' .. id)
  elseif n < 0 then
    give_back(acc, -n, 0)
    event(acc, 'refund', -n, feature, 'lease:' .. id)
  end
  if n ~= 0 then
    add_used(acc, feature, n)
    spent = spent + n
  end
end

local raw = redis.call('HGETALL', KEYS[2])
local others, last_exp = 0, now_ms + ttl
for i = 1, #raw, 2 do
  local held, _, exp = parse_lease(raw[i + 1])
  if raw[i] ~= id then
    if exp > now_ms then
      others = others + held
      last_exp = math.max(last_exp, exp)
    else
      redis.call('HDEL', KEYS[2], raw[i])
    end
  end
end
-- What the lease held before the sync, less what it reports spent, is still
-- its own: credits spent while this sync was on its way come out of it.
local floor = math.min(unspent, math.max(0, prior - spent))
local grant = math.max(floor, math.min(want, balance(acc) - others - keep))
redis.call('HSET', KEYS[2], id, table.concat({str(grant), str(seq), str(now_ms + ttl)}, ' '))
redis.call('PEXPIRE', KEYS[2], last_exp - now_ms)
commit(KEYS[1], KEYS[3], acc)
return {0, grant, balance(acc)}
