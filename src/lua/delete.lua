#!lua
-- Delete one channel's log, its bookkeeping and the writing master's mark (see broadcast.lua),
-- atomically. Returns how many messages the log held. Without bookkeeping, a replay from any
-- cursor but 0 reports itself incomplete, and the next broadcast starts a new history (a new
-- epoch).

local log_key = KEYS[1]
local meta_key = KEYS[2]
local mark_key = KEYS[3]

local count = redis.call('ZCARD', log_key)
redis.call('DEL', log_key, meta_key, mark_key)
return count
