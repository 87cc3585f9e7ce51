#!lua
-- Delete one channel's log and its bookkeeping, atomically.
-- KEYS[1]: the log. KEYS[2]: its bookkeeping (see broadcast.lua).
-- Returns how many messages the log held. Without bookkeeping, a replay from any cursor but 0
-- reports itself incomplete, and the next broadcast starts a new history (a new epoch).
local count = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return count
