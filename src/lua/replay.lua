#!lua flags=no-writes
-- The messages of one log after a cursor, and whether that replay is complete.
-- KEYS[1]: the log. KEYS[2]: its bookkeeping, "base floor top fresh" (see broadcast.lua).
-- ARGV[1]: the exclusive lower bound, e.g. "(1700000000000". ARGV[2]: the cursor as a number.
-- ARGV[3]: the most messages to return, or -1 for all. ARGV[4]: the epoch the client
-- last saw, or "" if it has none.
-- Returns {complete (1 or 0), {messages...}, epoch, latest timestamp or false}: the newest
-- timestamp issued on the channel, stored or since removed, is where "from now" starts. The epoch
-- names this log's history: it changes when the bookkeeping is lost (FLUSHALL, a restart
-- without persistence).

local messages
if ARGV[3] == '-1' then
    messages = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
else
    messages = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[3])
end

local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2] or false
local since = tonumber(ARGV[2])
local meta = redis.call('GET', KEYS[2])
if not meta then
    -- Nothing is known of this log's past: only "everything" of nothing is complete.
    local complete = since <= 0 and not newest and ARGV[4] == ''
    return {complete and 1 or 0, messages, '', newest}
end

local base, floor, top, fresh = string.match(meta, '^(%d+) (%d+) (%d+) (%d)$')
floor, top = tonumber(floor), tonumber(top)
if not newest and top > floor then
    -- The log expired: everything up to the newest message is gone.
    floor = top
end
-- Vouched for: cursors at or after the base and the newest removal, and not after the
-- newest message (a cursor from the future comes from a history that was lost).
local complete = since >= floor and since <= top
    and (since >= tonumber(base) or (since <= 0 and fresh == '1'))
    and (ARGV[4] == '' or ARGV[4] == base)
return {complete and 1 or 0, messages, base, string.format('%d', top)}
