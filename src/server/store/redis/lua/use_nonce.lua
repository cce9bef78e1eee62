-- KEYS: nonces, revoked (both of the first terminal). ARGV: nonce, not_after, now, capacity,
-- key TTL, second, issued_at. Returns 1 (recorded), 0 (used before), -1 (`capacity` unexpired
-- nonces of this first terminal already) or -2 (the first terminal revoked the second's tickets
-- issued at or before `issued_at`). Expired nonces are dropped only when the set is full, as in
-- the in-memory ReplayCache.
local revoked = redis.call('HGET', KEYS[2], ARGV[6])
if revoked and tonumber(revoked) >= tonumber(ARGV[7]) then
  return -2
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local capacity = tonumber(ARGV[4])
if redis.call('ZCARD', KEYS[1]) >= capacity then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
  if redis.call('ZCARD', KEYS[1]) >= capacity then
    return -1
  end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
extend(KEYS[1], tonumber(ARGV[5]))
return 1
