#!lua
-- Publish one message and store it in its channel's log, atomically.
-- The shebang makes Redis refuse the whole script up front when it may not write (OOM, replica).
-- The message's format, and the tail this script adds to it, are defined in src/message.rs.
--
-- The bookkeeping, one string per log: "base top fresh epoch break". This is its one
-- definition; replay.lua reads it. `top` is the newest timestamp issued, `base` the first
-- cursor the log vouches for, `fresh` whether it vouches for cursor 0 too, `epoch` the name of
-- this history: the Redis time in µs when it began, so a log deleted and started again within
-- one millisecond still gets a new one. `break`: a timestamp a new master issued after a
-- failover, stored with no message (0 for none); its messages chain to it. What the old master
-- acknowledged last may never have reached the replica that took over, so no replay from a
-- cursor before `break` is vouched for, and no message after it follows such a cursor.
-- The writing master's mark tells a new master: it is written without replication (nor AOF),
-- so a replica that took over, or a master restarted from its AOF, lacks it while it has the
-- replicated bookkeeping. The first broadcast there records the break; a replay that comes
-- first has seal.lua record it (replay.lua reports the missing mark). Resharding moves the
-- mark with the channel's other keys.
-- (Bookkeeping written before `epoch` or `break` existed has three or four fields; its epoch is
-- `base`, and no break is recorded until a master has marked it.)
-- `prev` chains each message to the one before, so a replay can tell whether anything
-- between a cursor and the oldest message left was removed, without any bookkeeping in prune.

local log_key = KEYS[1] -- the log, a sorted set scored by timestamp
local meta_key = KEYS[2] -- its bookkeeping
local mark_key = KEYS[3] -- the writing master's mark
local once_key = KEYS[4] -- the idempotency key of this publish, when given
local channel = ARGV[1] -- the pub/sub channel
local head = ARGV[2] -- the message up to the tail this script adds (see src/message.rs)
local ttl_ms = ARGV[3] -- the log's time to live
local max_len = tonumber(ARGV[4]) -- the most entries kept, 0 for no cap
local once_window_ms = ARGV[5] -- how long the idempotency key is remembered
local sharded = ARGV[6] == '1' -- SPUBLISH on a cluster's shard (the channel shares the keys' tag)

-- A retried publish returns the first one's timestamp and does nothing else.
if once_key then
    local first = redis.call('GET', once_key)
    if first then
        return tonumber(first)
    end
end

-- The Redis clock, not the app server's: skewed app clocks cannot reorder a channel.
local now = redis.call('TIME')
local timestamp = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local base, top, fresh, epoch, broken
local meta = redis.call('GET', meta_key)
if meta then
    base, top, fresh, epoch, broken = string.match(meta, '^(%d+) (%d+) (%d) ?(%d*) ?(%d*)$')
    top = tonumber(top)
end
-- Bookkeeping with a `break` field was written by a master that marks it; without this
-- master's mark, another wrote it: a failover happened since, and this is the break.
local marked_history = top and broken ~= ''
if marked_history and redis.call('EXISTS', mark_key) == 0 then
    top = top + 1
    broken = string.format('%d', top)
elseif not marked_history then
    broken = '0'
end
if not top then
    -- No (readable) bookkeeping: a new channel, one lost to FLUSHALL or expiry, or a log the
    -- article's code wrote. Entries already there are intact from the newest one on.
    local newest = tonumber(redis.call('ZRANGE', log_key, -1, -1, 'WITHSCORES')[2])
    top = newest and math.ceil(newest)
    base = string.format('%d', top or timestamp)
    fresh = top and '0' or '1'
    epoch = now[1] .. string.format('%06d', tonumber(now[2]))
end
if epoch == '' then
    epoch = base
end

local message
if top then
    -- Strictly after the newest, so every message has a cursor of its own.
    if top >= timestamp then
        timestamp = top + 1
    end
    message = string.format('%s,"prev":%d,"timestamp":%d}', head, top, timestamp)
else
    -- The first message of a history: nothing to chain to.
    message = string.format('%s,"timestamp":%d}', head, timestamp)
end
redis.call('ZADD', log_key, timestamp, message)
redis.call(sharded and 'SPUBLISH' or 'PUBLISH', channel, message)

if max_len > 0 and redis.call('ZCARD', log_key) > max_len then
    redis.call('ZREMRANGEBYRANK', log_key, 0, -max_len - 1)
end

-- Idle channels vanish by themselves; the bookkeeping outlives the log, so a replay after
-- the log expired can still tell that messages were lost.
local bookkeeping_ttl = string.format('%d', tonumber(ttl_ms) * 2)
redis.call('PEXPIRE', log_key, ttl_ms)
redis.call('SET', meta_key,
    string.format('%s %d %s %s %s', base, timestamp, fresh, epoch, broken),
    'PX', bookkeeping_ttl)
redis.set_repl(redis.REPL_NONE)
redis.call('SET', mark_key, '1', 'PX', bookkeeping_ttl)
redis.set_repl(redis.REPL_ALL)
if once_key then
    redis.call('SET', once_key, string.format('%d', timestamp), 'PX', once_window_ms)
end
return timestamp
