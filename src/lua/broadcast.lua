#!lua
-- Publish one message and store it in its channel's log, atomically.
-- KEYS[1]: the log (sorted set). ARGV[1]: the pub/sub channel.
-- ARGV[2], ARGV[3]: the message JSON before and after its timestamp.
-- The shebang makes Redis refuse the whole script up front when it may not write (OOM, replica).

-- The Redis clock, not the app server's: skewed app clocks cannot reorder a channel.
local now = redis.call('TIME')
local timestamp = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

-- Strictly after the newest entry, so every message has a cursor of its own.
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
    local last = tonumber(newest[2])
    if last >= timestamp then
        timestamp = last + 1
    end
end

local message = ARGV[2] .. string.format('%d', timestamp) .. ARGV[3]
redis.call('ZADD', KEYS[1], timestamp, message)
redis.call('PUBLISH', ARGV[1], message)
return timestamp
