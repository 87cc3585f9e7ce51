#!lua
-- Publish one message and store it in its channel's log, atomically.
-- The shebang makes Redis refuse the whole script up front when it may not write (OOM, replica).
-- The message's format, and the tail this script adds to it, are defined in src/message.rs.
--
-- The bookkeeping, one string per log: "base top fresh epoch writer break". This is its one
-- definition; replay.lua reads it. `top` is the newest timestamp issued, `base` the first
-- cursor the log vouches for, `fresh` whether it vouches for cursor 0 too, `epoch` the name of
-- this history: the Redis time in µs when it began, so a log deleted and started again within
-- one millisecond still gets a new one. `writer` is the replication ID of the master that wrote
-- last; `break` the first timestamp written after a failover from that master (0 for none):
-- what the old master acknowledged last may not have reached the replica that took over, so no
-- replay from a cursor before `break` is vouched for. (Bookkeeping written before these fields
-- existed has three or four; its epoch is `base`, its writer unknown.)
-- `prev` chains each message to the one before, so a replay can tell whether anything
-- between a cursor and the oldest message left was removed, without any bookkeeping in prune.

local log_key = KEYS[1] -- the log, a sorted set scored by timestamp
local meta_key = KEYS[2] -- its bookkeeping
local once_key = KEYS[3] -- the idempotency key of this publish, when given
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

-- This master, and the one it took over from (a promoted replica's replid2).
local replication = redis.call('INFO', 'replication')
local writer = string.match(replication, 'master_replid:(%x+)') or ''
local taken_over = string.match(replication, 'master_replid2:(%x+)') or ''

local base, top, fresh, epoch, last_writer, broken
local meta = redis.call('GET', meta_key)
if meta then
    base, top, fresh, epoch, last_writer, broken =
        string.match(meta, '^(%d+) (%d+) (%d) ?(%d*) ?(%x*) ?(%d*)$')
    top = tonumber(top)
end
if not top then
    -- No (readable) bookkeeping: a new channel, one lost to FLUSHALL or expiry, or a log the
    -- article's code wrote. Entries already there are intact from the newest one on.
    local newest = tonumber(redis.call('ZRANGE', log_key, -1, -1, 'WITHSCORES')[2])
    top = newest and math.ceil(newest)
    base = string.format('%d', top or timestamp)
    fresh = top and '0' or '1'
    epoch = now[1] .. string.format('%06d', tonumber(now[2]))
    last_writer = writer
    broken = '0'
end
if epoch == '' then
    epoch = base
end
if broken == '' then
    broken = '0'
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
redis.call('PEXPIRE', log_key, ttl_ms)
-- The first write after a failover from the last writer marks the break (see above).
if last_writer ~= writer and last_writer ~= '' and last_writer == taken_over then
    broken = string.format('%d', timestamp)
end
redis.call('SET', meta_key,
    string.format('%s %d %s %s %s %s', base, timestamp, fresh, epoch, writer, broken),
    'PX', string.format('%d', tonumber(ttl_ms) * 2))
if once_key then
    redis.call('SET', once_key, string.format('%d', timestamp), 'PX', once_window_ms)
end
return timestamp
