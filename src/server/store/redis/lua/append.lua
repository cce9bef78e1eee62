-- KEYS: epoch, cursor, log, expiry, collapse. ARGV: the epoch expected, expires_at, key TTL,
-- the encoded item[, collapse key]. Returns the item's offset, or -1 when the epoch key is
-- missing or holds another epoch (nothing written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local offset = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
local ttl = tonumber(ARGV[3])
local collapse = ARGV[5]
if collapse then
  local old = redis.call('HGET', KEYS[5], collapse)
  if old then
    old = tonumber(old)
    if old >= tonumber(redis.call('HGET', KEYS[2], 'acked') or '0') then
      redis.call('ZREMRANGEBYSCORE', KEYS[3], old, old)
      redis.call('ZREM', KEYS[4], be64(old))
    end
  end
  redis.call('HSET', KEYS[5], collapse, offset)
  extend(KEYS[5], ttl)
end
local id = be64(offset)
redis.call('ZADD', KEYS[3], offset, id .. ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[2], id)
redis.call('HSET', KEYS[2], 'next', offset + 1)
extend(KEYS[3], ttl)
extend(KEYS[4], ttl)
return offset
