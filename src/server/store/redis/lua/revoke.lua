-- KEYS: revoked (a hash of the first terminal: second → revoked at). ARGV: second, revoked at
-- (by the first terminal's clock), TTL: how long the newest revocation must be kept (until
-- every ticket it refuses has expired). A revocation time only grows.
local at = tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if at > old then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local ttl = tonumber(ARGV[3])
if redis.call('TTL', KEYS[1]) < ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return 1
