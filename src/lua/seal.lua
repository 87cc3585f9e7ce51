#!lua
-- Records a failover's break before the new master's first broadcast on a channel, as
-- broadcast.lua would (the bookkeeping and the break are defined in its header): a replay that
-- found the mark missing (replay.lua's `unsealed`) runs this, then replays again. So the
-- cursor a client goes on from once told of the break is one the messages after it chain to.
-- Returns 1 if it recorded a break, 0 if there was none to record.

local meta_key = KEYS[1] -- the bookkeeping
local mark_key = KEYS[2] -- the writing master's mark

local meta = redis.call('GET', meta_key)
if not meta or redis.call('EXISTS', mark_key) == 1 then
    return 0
end
local base, top, fresh, epoch, broken = string.match(meta, '^(%d+) (%d+) (%d) ?(%d*) ?(%d*)$')
if not base or broken == '' then
    return 0 -- bookkeeping no master marked: there is no break to tell
end
local ttl_ms = redis.call('PTTL', meta_key)
local issued = string.format('%d', tonumber(top) + 1)
redis.call('SET', meta_key,
    string.format('%s %s %s %s %s', base, issued, fresh, epoch, issued), 'KEEPTTL')
redis.set_repl(redis.REPL_NONE)
if ttl_ms > 0 then
    redis.call('SET', mark_key, '1', 'PX', ttl_ms)
else
    redis.call('SET', mark_key, '1')
end
redis.set_repl(redis.REPL_ALL)
return 1
