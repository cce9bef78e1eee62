-- KEYS: followers, since, revoked (all three of the first terminal). ARGV: second, until, since,
-- key TTL, and the ticket's issue time (or -1: no check). Links the second to the first (kept
-- where an earlier link began in the first's stream) unless the first revoked the second's
-- tickets issued at or before that time: then returns -2 and links nothing. Checked in the same
-- step as the link, so a revocation that came after the follow's nonce was checked still wins.
-- Else returns 1.
local issued = tonumber(ARGV[5])
if issued >= 0 then
  local revoked = redis.call('HGET', KEYS[3], ARGV[1])
  if revoked and tonumber(revoked) >= issued then
    return -2
  end
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
for i = 1, 2 do
  if redis.call('TTL', KEYS[i]) < ttl then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return 1
