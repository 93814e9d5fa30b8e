-- KEYS: request marker, the request's kept response. ARGV[8] attempt id,
-- ARGV[9] how long, in seconds, a completed call's key is kept (its marker
-- and response: the Idempotency-Key's lifetime, 24 h by default), ARGV[10]
-- 1 to keep ARGV[11] (the response, as the gateway wrote it), 0 when it was
-- too large to keep.
--
-- Marks a call with an Idempotency-Key done, once its response has gone
-- out: every later call with the key is answered the kept response (or told
-- it was too large), for the key's lifetime. Only the attempt that
-- charged may, and only while its charge stands.
-- Returns {code}: OK kept, REPEAT done before, NOT_FOUND no charge of this
-- attempt stands (nothing written).

--#include lib/marker.lua

local bad = check_types({'string', 'string'})
if bad then return bad end
local marker_key, kept_key = KEYS[1], KEYS[2]
local attempt = ARGV[8]
local key_ttl = ARGV[9]

local m = parse_marker(redis.call('GET', marker_key))
if not m or m.attempt ~= attempt or marker_free(m) then
  return {NOT_FOUND}
end
if m.state == DONE then
  return {REPEAT}
end
m.state = DONE
write_marker(marker_key, m, key_ttl)
if ARGV[10] == '1' then
  redis.call('SET', kept_key, ARGV[11], 'EX', key_ttl)
end
return {OK}
