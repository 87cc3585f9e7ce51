#!lua flags=no-writes
-- The messages of one log after a cursor, and whether that replay is complete.
-- Returns {complete (1 or 0), {messages...}, epoch, latest timestamp or false, unsealed (1 or
-- 0)}: the newest timestamp issued on the channel, stored or since removed, is where "from
-- now" starts. The epoch names this log's history: it changes when the bookkeeping is lost
-- (FLUSHALL, a restart without persistence). `unsealed`: a failover happened and this master
-- has not recorded its break yet (seal.lua does).
--
-- Logs only ever lose their oldest entries (prune, max_len, expiry), so the log is an unbroken
-- run of the channel's latest messages. The replay is complete when the first message after
-- the cursor comes right after it: its `prev` is at or before the cursor (the message format
-- is defined in src/message.rs).

local log_key = KEYS[1]
local meta_key = KEYS[2] -- the bookkeeping, as broadcast.lua defines and writes it
local mark_key = KEYS[3] -- the writing master's mark (broadcast.lua)
local after = ARGV[1] -- the exclusive lower bound, e.g. "(1700000000000"
local since = tonumber(ARGV[2]) -- the cursor as a number
local limit = ARGV[3] -- the most messages to return, or "-1" for all
local client_epoch = ARGV[4] -- the epoch the client last saw, or "" if it has none

local messages
if limit == '-1' then
    messages = redis.call('ZRANGEBYSCORE', log_key, after, '+inf')
else
    messages = redis.call('ZRANGEBYSCORE', log_key, after, '+inf', 'LIMIT', 0, limit)
end

local meta = redis.call('GET', meta_key)
if not meta then
    -- Nothing is known of this log's past: only "everything" of nothing is complete.
    local newest = redis.call('ZRANGE', log_key, -1, -1, 'WITHSCORES')[2] or false
    local complete = since <= 0 and not newest and client_epoch == ''
    return {complete and 1 or 0, messages, '', newest, 0}
end

local base, top, fresh, epoch, broken = string.match(meta, '^(%d+) (%d+) (%d) ?(%d*) ?(%d*)$')
if not base then
    return {0, messages, '', false, 0} -- unreadable bookkeeping: nothing can be vouched for
end
local complete
if since >= tonumber(top) then
    -- Nothing after the cursor was ever issued; a cursor past `top` comes from a history
    -- that was lost.
    complete = since == tonumber(top)
else
    local first = redis.call('ZRANGEBYSCORE', log_key, after, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if not first[1] then
        complete = false -- everything after the cursor is gone
    else
        -- The tail of src/message.rs, read as its `prev` reads it.
        local prev = string.match(first[1], ',"prev":(%d+),"timestamp":%d+}$')
        if prev then
            complete = since >= tonumber(prev)
        else
            -- No link: the first message of the log's history vouches for "everything" on a
            -- fresh log; one the article's code wrote vouches for nothing.
            complete = since <= 0 and fresh == '1' and tonumber(first[2]) == tonumber(base)
        end
    end
end
if epoch == '' then
    epoch = base
end
-- Across a failover, the old master's last acknowledged messages may be missing: from
-- before the break the new master recorded, or, before it has recorded one, from any cursor
-- (bookkeeping that a master marked, without this master's mark).
local unsealed = broken ~= '' and redis.call('EXISTS', mark_key) == 0
if unsealed or (broken ~= '' and since < tonumber(broken)) then
    complete = false
end
complete = complete and (client_epoch == '' or client_epoch == epoch)
return {complete and 1 or 0, messages, epoch, top, unsealed and 1 or 0}
