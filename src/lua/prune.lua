#!lua flags=allow-cross-slot-keys
-- Trim entries scored at or below ARGV[1] from each log, and record in its bookkeeping
-- the newest entry removed, so replays after a cursor older than that report incomplete.
-- KEYS: log, bookkeeping, log, bookkeeping, ... (one SCAN step's worth).
-- Returns how many entries it removed.
local removed = 0
for i = 1, #KEYS, 2 do
    local newest_old = redis.call('ZREVRANGEBYSCORE', KEYS[i], ARGV[1], '-inf',
        'WITHSCORES', 'LIMIT', 0, 1)[2]
    if newest_old then
        removed = removed + redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
        local meta = redis.call('GET', KEYS[i + 1])
        if meta then
            local base, floor, rest = string.match(meta, '^(%d+) (%d+) (.*)$')
            if tonumber(newest_old) > tonumber(floor) then
                redis.call('SET', KEYS[i + 1], base .. ' ' .. newest_old .. ' ' .. rest, 'KEEPTTL')
            end
        end
    end
end
return removed
