-- KEYS: seen (the zset of terminals by when they were last seen), then the terminal's known,
-- session, followers and following keys. ARGV: the terminal's ID, seen_before, now.
-- Forgets the terminal (its known entry and session) if it was last seen before `seen_before`
-- and has no link alive at `now`; returns 1 then. A terminal kept for a live link is scored
-- `seen_before` (never lowered), so one sweep does not visit it twice; returns 0.
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seen or tonumber(seen) >= tonumber(ARGV[2]) then
  return 0
end
local live = '(' .. ARGV[3]
if redis.call('ZCOUNT', KEYS[4], live, '+inf') > 0
    or redis.call('ZCOUNT', KEYS[5], live, '+inf') > 0 then
  redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
