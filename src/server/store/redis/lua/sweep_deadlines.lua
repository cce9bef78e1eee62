-- KEYS: a zset scored by deadlines (links, nonces). ARGV: now. Removes the members due at
-- `now`; returns the earliest deadline left, or -1 for an empty set.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then
  return -1
end
return tonumber(first[2])
