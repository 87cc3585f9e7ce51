#!lua flags=allow-cross-slot-keys
-- Trim entries scored at or below ARGV[1] from each log, and record in its bookkeeping
-- the newest entry removed, so replays after a cursor older than that report incomplete.
-- KEYS: log, bookkeeping, log, bookkeeping, ... (one SCAN step's worth).
-- Returns how many entries it removed.
local removed = 0
for i = 1, #KEYS, 2 do
    local newest_old = redis.call('ZREVRANGEBYSCORE', KEYS[i], ARGV[1], '-inf',
        'WITHSCORES', 'LIMIT', 0, 1)
    if newest_old[2] then
        removed = removed + redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
        local floor = tonumber(redis.call('HGET', KEYS[i + 1], 'floor'))
        if floor and tonumber(newest_old[2]) > floor then
            redis.call('HSET', KEYS[i + 1], 'floor', newest_old[2])
        end
    end
end
return removed
