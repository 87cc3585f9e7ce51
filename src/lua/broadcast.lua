#!lua
-- Publish one message and store it in its channel's log, atomically.
-- KEYS[1]: the log (sorted set). KEYS[2]: its bookkeeping (string, see below).
-- KEYS[3], when given: the idempotency key of this publish.
-- ARGV[1]: the pub/sub channel. ARGV[2], ARGV[3]: the message JSON before and after its
-- timestamp. ARGV[4]: the log's time to live in ms. ARGV[5]: the most entries kept, 0 for
-- no cap. ARGV[6]: how long, in ms, the idempotency key is remembered.
-- The shebang makes Redis refuse the whole script up front when it may not write (OOM, replica).
--
-- Bookkeeping, "base floor top fresh": `top` is the newest timestamp issued, `floor` the
-- newest one removed, `base` the first cursor the log vouches for (and its epoch), `fresh`
-- whether it vouches for cursor 0. One string, one GET and one SET: cheaper than a hash.

-- A retried publish returns the first one's timestamp and does nothing else.
if KEYS[3] then
    local first = redis.call('GET', KEYS[3])
    if first then
        return tonumber(first)
    end
end

-- The Redis clock, not the app server's: skewed app clocks cannot reorder a channel.
local now = redis.call('TIME')
local timestamp = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[4])

local base, floor, top, fresh
local meta = redis.call('GET', KEYS[2])
if meta then
    base, floor, top, fresh = string.match(meta, '^(%d+) (%d+) (%d+) (%d)$')
    floor, top = tonumber(floor), tonumber(top)
    -- The log's TTL ran from the broadcast of `top`; only near its end can it be gone.
    if timestamp + 60000 >= top + ttl and redis.call('EXISTS', KEYS[1]) == 0 then
        floor = top
    end
else
    -- No bookkeeping: a new channel, one lost to FLUSHALL or expiry, or a log the
    -- article's code wrote. Entries already there are intact from the newest one on.
    local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    top = tonumber(newest[2])
    base = newest[2] or string.format('%d', timestamp)
    floor = 0
    fresh = top and '0' or '1'
end
-- Strictly after the newest, so every message has a cursor of its own.
if top and top >= timestamp then
    timestamp = top + 1
end

local message = ARGV[2] .. string.format('%d', timestamp) .. ARGV[3]
redis.call('ZADD', KEYS[1], timestamp, message)
redis.call('PUBLISH', ARGV[1], message)

local max_len = tonumber(ARGV[5])
if max_len > 0 then
    local excess = redis.call('ZCARD', KEYS[1]) - max_len
    if excess > 0 then
        local cut = redis.call('ZRANGE', KEYS[1], excess - 1, excess - 1, 'WITHSCORES')
        redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
        floor = math.max(floor, tonumber(cut[2]))
    end
end

-- Idle channels vanish by themselves; the bookkeeping outlives the log, so a replay after
-- the log expired can still tell that messages were lost.
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], string.format('%s %d %d %s', base, floor, timestamp, fresh),
    'PX', ttl * 2)
if KEYS[3] then
    redis.call('SET', KEYS[3], string.format('%d', timestamp), 'PX', ARGV[6])
end
return timestamp
