-- Shared Lua helpers: offsets as 8 big-endian bytes (exact below 2^53, which offsets never
-- reach), and a TTL that only grows.
local function be64(n)
  local b = {}
  for i = 8, 1, -1 do
    b[i] = n % 256
    n = math.floor(n / 256)
  end
  return string.char(unpack(b))
end
local function unbe64(s)
  local n = 0
  for i = 1, 8 do
    n = n * 256 + string.byte(s, i)
  end
  return n
end
local function extend(key, ttl)
  local left = redis.call('TTL', key)
  if left ~= -2 and left < ttl then
    redis.call('EXPIRE', key, ttl)
  end
end
