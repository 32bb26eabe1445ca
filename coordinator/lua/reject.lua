-- Record why a shard's upload was refused, once per (shard, volunteer, upload).
-- KEYS: round hash, round rejections hash, round accepted hash
-- ARGV: shard, JSON entry, rejection id
-- Returns 'rejected' | 'repeat' | 'duplicate' (the shard is accepted already) | 'late'
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'open' then redis.call('HINCRBY', KEYS[1], 'late', 1) return 'late' end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 'duplicate' end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[2]) == 0 then return 'repeat' end
redis.call('HINCRBY', KEYS[1], 'rejected', 1)
return 'rejected'
