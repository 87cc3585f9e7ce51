#!lua
-- Publish one message and store it in its channel's log, atomically.
-- KEYS[1]: the log (sorted set). KEYS[2]: its bookkeeping (string, see below). KEYS[3]: this
-- master's mark on the channel (see below). KEYS[4], when given: the idempotency key.
-- ARGV[1]: the pub/sub channel. ARGV[2]: the message JSON up to its last fields, which the
-- script adds: `,"prev":<timestamp before>,"timestamp":<timestamp>}`. ARGV[3]: the log's
-- time to live in ms. ARGV[4]: the most entries kept, 0 for no cap. ARGV[5]: how long, in
-- ms, the idempotency key is remembered. ARGV[6]: "1" to publish on a cluster's shard
-- (SPUBLISH; the channel then shares the keys' hash tag), else "0".
-- The shebang makes Redis refuse the whole script up front when it may not write (OOM, replica).
--
-- Bookkeeping, "base top fresh epoch break": `top` is the newest timestamp issued, `base` the
-- first cursor the log vouches for, `fresh` whether it vouches for cursor 0 too, `epoch` the
-- name of this history: the Redis time in µs when it began, so a log deleted and started again
-- within one millisecond still gets a new one. `break`: the first timestamp a new master wrote
-- after a failover (0 for none). What the old master acknowledged last may never have reached
-- the replica that took over, so no replay from a cursor before `break` is vouched for.
-- The mark (KEYS[3]) tells a new master: it is written without replication (nor AOF), so a
-- replica that took over, or a master restarted from its AOF, lacks it while the bookkeeping,
-- replicated, is there. Resharding moves it with the channel's keys.
-- (Bookkeeping written before `epoch` or `break` existed has three or four fields; its epoch is
-- `base`, and no break is recorded until a master has marked it.)
-- `prev` chains each message to the one before, so a replay can tell whether anything
-- between a cursor and the oldest message left was removed, without any bookkeeping in prune.

-- A retried publish returns the first one's timestamp and does nothing else.
if KEYS[4] then
    local first = redis.call('GET', KEYS[4])
    if first then
        return tonumber(first)
    end
end

-- The Redis clock, not the app server's: skewed app clocks cannot reorder a channel.
local now = redis.call('TIME')
local timestamp = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local base, top, fresh, epoch, broken
local meta = redis.call('GET', KEYS[2])
if meta then
    base, top, fresh, epoch, broken = string.match(meta, '^(%d+) (%d+) (%d) ?(%d*) ?(%d*)$')
    top = tonumber(top)
end
-- Bookkeeping with a `break` field was written by a master that marks it.
local marked_history = top and broken ~= ''
if not top then
    -- No (readable) bookkeeping: a new channel, one lost to FLUSHALL or expiry, or a log the
    -- article's code wrote. Entries already there are intact from the newest one on.
    local newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
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
    message = string.format('%s,"prev":%d,"timestamp":%d}', ARGV[2], top, timestamp)
else
    -- The first message of a history: nothing to chain to.
    message = string.format('%s,"timestamp":%d}', ARGV[2], timestamp)
end
redis.call('ZADD', KEYS[1], timestamp, message)
redis.call(ARGV[6] == '1' and 'SPUBLISH' or 'PUBLISH', ARGV[1], message)

local max_len = tonumber(ARGV[4])
if max_len > 0 and redis.call('ZCARD', KEYS[1]) > max_len then
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -max_len - 1)
end

-- Idle channels vanish by themselves; the bookkeeping outlives the log, so a replay after
-- the log expired can still tell that messages were lost.
local ttl = tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Bookkeeping this master did not mark was written by another: a failover happened since.
if marked_history and redis.call('EXISTS', KEYS[3]) == 0 then
    broken = string.format('%d', timestamp)
elseif not marked_history then
    broken = '0'
end
redis.call('SET', KEYS[2],
    string.format('%s %d %s %s %s', base, timestamp, fresh, epoch, broken),
    'PX', string.format('%d', ttl * 2))
redis.set_repl(redis.REPL_NONE)
redis.call('SET', KEYS[3], '1', 'PX', string.format('%d', ttl * 2))
redis.set_repl(redis.REPL_ALL)
if KEYS[4] then
    redis.call('SET', KEYS[4], string.format('%d', timestamp), 'PX', ARGV[5])
end
return timestamp
