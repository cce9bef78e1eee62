-- KEYS: revoked (a hash: second → revoked at, by the first terminal's clock), revoked_until (a
-- zset: second, scored by when its revocation no longer matters), followers (all three of the
-- first terminal). ARGV: second, revoked at, key TTL, capacity, keep until, now. Ends the link
-- on the first terminal's side in any case, then records the revocation unless the first
-- terminal keeps `capacity` live ones already and none for this second: then returns -1 (after
-- dropping those no longer needed, if that makes no room). Else returns the links removed (0
-- or 1). A revocation time only grows.
local removed = redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  local capacity = tonumber(ARGV[4])
  if redis.call('HLEN', KEYS[1]) >= capacity then
    local done = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
    for _, second in ipairs(done) do
      redis.call('HDEL', KEYS[1], second)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
    if redis.call('HLEN', KEYS[1]) >= capacity then
      return -1
    end
  end
end
local at = tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if at > old then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('ZADD', KEYS[2], 'GT', ARGV[5], ARGV[1])
local ttl = tonumber(ARGV[3])
for i = 1, 2 do
  if redis.call('TTL', KEYS[i]) < ttl then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return removed
