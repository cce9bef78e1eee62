-- KEYS: cursor, log, expiry. ARGV: next. Moves `acked` up to `next` (clamped to the log's end,
-- never down) and removes the items below it.
local n = redis.call('HGET', KEYS[1], 'next')
if not n then
  return 0
end
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local upto = math.min(tonumber(ARGV[1]), tonumber(n))
if upto <= acked then
  return 0
end
local bound = string.format('(%.0f', upto)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', bound)
for i = 1, #gone do
  redis.call('ZREM', KEYS[3], string.sub(gone[i], 1, 8))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', bound)
redis.call('HSET', KEYS[1], 'acked', upto)
return 1
