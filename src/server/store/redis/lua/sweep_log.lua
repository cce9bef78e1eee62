-- KEYS: cursor, log, expiry, collapse. ARGV: now. Removes items expired at `now` and collapse
-- entries whose item is gone; returns the earliest expiry left, or -1 for an empty log.
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
for i = 1, #dead do
  local o = unbe64(dead[i])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], o, o)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local entries = redis.call('HGETALL', KEYS[4])
for i = 1, #entries, 2 do
  local o = tonumber(entries[i + 1])
  if o < acked or not redis.call('ZSCORE', KEYS[3], be64(o)) then
    redis.call('HDEL', KEYS[4], entries[i])
  end
end
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #first == 0 then
  return -1
end
return tonumber(first[2])
