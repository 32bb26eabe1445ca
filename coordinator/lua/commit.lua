-- End a claimed round: publish the staged model as base+1 ('done') or record 'failed'.
-- With a lossy downlink the staged update (version base+1 as encoded from base) and the
-- downlink residual are published in the same step, so what volunteers rebuild from the
-- updates is always the published model.
-- Every model, update, residual and strategy state is a chunk list (broker/blobs.py):
-- RENAME moves one whole, PERSIST keeps all its chunks.
-- KEYS: version, staged model, final model, round hash, strategy, deadlines zset,
--       staged update, final update, staged residual, residual, staged strategy
-- ARGV: base version, owner, summary JSON, (unused), deadline member, 'done' | 'failed', reason
-- Returns 'done' | 'failed' | 'lost' (our claim was taken over: nothing written) |
--         'stale-base' (the run moved past our base: the round is failed with that reason)
if redis.call('HGET', KEYS[4], 'claim_owner') ~= ARGV[2]
   or redis.call('HGET', KEYS[4], 'status') ~= 'aggregating' then return 'lost' end
if ARGV[6] == 'done' then
  if tonumber(redis.call('GET', KEYS[1])) ~= tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[4], 'status', 'failed', 'reason', 'the run moved past the round\'s base version')
    redis.call('ZREM', KEYS[6], ARGV[5])
    return 'stale-base'
  end
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('PERSIST', KEYS[3])  -- the staged copy expires; a published version never does
  redis.call('SET', KEYS[1], tonumber(ARGV[1]) + 1)
  if redis.call('EXISTS', KEYS[11]) == 1 then
    redis.call('RENAME', KEYS[11], KEYS[5])
    redis.call('PERSIST', KEYS[5])
  end
  if redis.call('EXISTS', KEYS[7]) == 1 then
    redis.call('RENAME', KEYS[7], KEYS[8])
    redis.call('PERSIST', KEYS[8])
  end
  if redis.call('EXISTS', KEYS[9]) == 1 then
    redis.call('RENAME', KEYS[9], KEYS[10])
    redis.call('PERSIST', KEYS[10])
  end
end
redis.call('HSET', KEYS[4], 'status', ARGV[6], 'summary', ARGV[3])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[4], 'reason', ARGV[7]) end
redis.call('ZREM', KEYS[6], ARGV[5])
return ARGV[6]
