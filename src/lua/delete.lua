#!lua
-- Delete one channel's log, its bookkeeping and the writing master's mark, atomically.
-- KEYS[1]: the log. KEYS[2]: its bookkeeping. KEYS[3]: the mark (see broadcast.lua).
-- Returns how many messages the log held. Without bookkeeping, a replay from any cursor but 0
-- reports itself incomplete, and the next broadcast starts a new history (a new epoch).
local count = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return count
