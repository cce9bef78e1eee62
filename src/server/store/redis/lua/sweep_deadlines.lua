-- KEYS: a zset scored by deadlines (links, nonces), and for a followers set the hash keyed by
-- its members (`since`). ARGV: now. Removes the members due at `now`, from the hash too;
-- returns the earliest deadline left, or -1 for an empty set.
if KEYS[2] then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  for i = 1, #due, 512 do
    redis.call('HDEL', KEYS[2], unpack(due, i, math.min(i + 511, #due)))
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
  if KEYS[2] then
    redis.call('DEL', KEYS[2])
  end
  return -1
end
return tonumber(first[2])
