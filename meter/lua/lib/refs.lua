-- The references of the writes applied to an org, each applied once.

--#include lib/base.lua

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
