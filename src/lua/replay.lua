#!lua flags=no-writes
-- The messages of one log after a cursor, and whether that replay is complete.
-- KEYS[1]: the log. KEYS[2]: its bookkeeping, as broadcast.lua keeps it.
-- ARGV[1]: the exclusive lower bound, e.g. "(1700000000000". ARGV[2]: the cursor as a number.
-- ARGV[3]: the most messages to return, or -1 for all. ARGV[4]: the epoch the client
-- last saw, or "" if it has none.
-- Returns {complete (1 or 0), {messages...}, epoch, newest timestamp or false}. The epoch names this log's history:
-- it changes when the bookkeeping is lost (FLUSHALL, a restart without persistence).

local messages
if ARGV[3] == '-1' then
    messages = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
else
    messages = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[3])
end

local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2] or false
local since = tonumber(ARGV[2])
local log_exists = newest ~= false
local meta = redis.call('HMGET', KEYS[2], 'base', 'floor', 'top', 'fresh')
local complete
if not meta[1] then
    -- Nothing is known of this log's past: only "everything" of nothing is complete.
    complete = since <= 0 and not log_exists and ARGV[4] == ''
    return {complete and 1 or 0, messages, '', newest}
else
    local floor = tonumber(meta[2])
    local top = tonumber(meta[3])
    if not log_exists and top > floor then
        -- The log expired: everything up to the newest message is gone.
        floor = top
    end
    -- Vouched for: cursors at or after the base and the newest removal, and not after the
    -- newest message (a cursor from the future comes from a history that was lost).
    complete = since >= floor and since <= top
        and (since >= tonumber(meta[1]) or (since <= 0 and meta[4] == '1'))
        and (ARGV[4] == '' or ARGV[4] == meta[1])
end
return {complete and 1 or 0, messages, meta[1], newest}
