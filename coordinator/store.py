"""Run and round state in Redis: the one place that knows crowdtrain's keys.

Every decision that must happen once — accepting a shard's delta, claiming a
round for aggregation, publishing the next model version — is a Lua script,
so it is atomic on the server however many aggregators and volunteers race.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import redis

PREFIX = "ct"
UPLOAD_TTL = 24 * 3600
# Round bookkeeping is kept this long after the round ends, then Redis drops it.
ROUND_TTL = 7 * 24 * 3600
# An aggregator holds a round this long without renewing its claim; after that
# (it crashed) another aggregator may take the round over.
CLAIM_LEASE = 10.0

# Returns {outcome, due}: due is 1 while the round is open with its quorum met,
# so a redelivered validation (its aggregator died) still triggers aggregation.
# The fencing token of a result is its upload key (volunteer, run, round,
# shard, attempt token): the same key seen again is a 'repeat', a second
# upload for an accepted shard a 'duplicate'.
_ACCEPT = """
local r = redis.call('HMGET', KEYS[1], 'status', 'quorum')
if r[1] ~= 'open' then redis.call('HINCRBY', KEYS[1], 'late', 1) return {'late', 0} end
local outcome = 'accepted'
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current == ARGV[2] then
  outcome = 'repeat'
elseif current then
  outcome = 'duplicate'
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'accepted', 1)
end
local due = 0
if tonumber(redis.call('HGET', KEYS[1], 'accepted')) >= tonumber(r[2]) then due = 1 end
return {outcome, due}
"""

# Rejections are keyed by shard and upload, so a redelivered one counts once.
_REJECT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'open' then redis.call('HINCRBY', KEYS[1], 'late', 1) return 'late' end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 'duplicate' end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[2]) == 0 then return 'repeat' end
redis.call('HINCRBY', KEYS[1], 'rejected', 1)
return 'rejected'
"""

_RENEW = """
if redis.call('HGET', KEYS[1], 'claim_owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'claim_until', ARGV[2])
return 1
"""

_CLAIM = """
local r = redis.call('HMGET', KEYS[1], 'status', 'accepted', 'quorum', 'deadline', 'claim_until')
local now = tonumber(ARGV[2])
local status = r[1]
if status == 'open' then
  if tonumber(r[2]) < tonumber(r[3]) and tonumber(r[4]) > now then return 0 end
elseif status == 'aggregating' then
  if tonumber(r[5]) > now then return 0 end
else
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'aggregating', 'claim_owner', ARGV[1],
           'claim_until', tostring(now + tonumber(ARGV[3])))
return 1
"""

# KEYS: version, staged model, final model, round, strategy, deadlines
# ARGV: base version, owner, summary json, strategy blob, deadline member, status
_COMMIT = """
if redis.call('HGET', KEYS[4], 'claim_owner') ~= ARGV[2] then return 0 end
if ARGV[6] == 'done' then
  if tonumber(redis.call('GET', KEYS[1])) ~= tonumber(ARGV[1]) then return 0 end
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('PERSIST', KEYS[3])  -- the staged copy expires; a published version never does
  redis.call('SET', KEYS[1], tonumber(ARGV[1]) + 1)
  redis.call('SET', KEYS[5], ARGV[4])
end
redis.call('HSET', KEYS[4], 'status', ARGV[6], 'summary', ARGV[3])
redis.call('ZREM', KEYS[6], ARGV[5])
return 1
"""


class UnknownRun(LookupError):
    """No run of that name exists on this broker."""


class RunExists(ValueError):
    """A run of that name exists already."""


class RoundOpen(RuntimeError):
    """The run already has a round in progress."""


class Store:
    """Typed access to crowdtrain's keys on one Redis server."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._accept = client.register_script(_ACCEPT)
        self._reject = client.register_script(_REJECT)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._commit = client.register_script(_COMMIT)

    # --- runs --------------------------------------------------------------
    def create_run(self, run: str, config: dict[str, Any], model_blob: bytes) -> None:
        """Create a run with model version 0; refuses to overwrite one."""
        if not self.redis.set(_k("run", run, "config"), msgpack.packb(config), nx=True):
            raise RunExists(f"run {run!r} exists already; choose another --run name")
        pipe = self.redis.pipeline()
        pipe.set(_k("run", run, "model", 0), model_blob)
        pipe.set(_k("run", run, "version"), 0)
        pipe.sadd(_k("runs"), run)
        pipe.execute()

    def run_config(self, run: str) -> dict[str, Any]:
        """The run's settings, as ``coordinator init`` stored them."""
        raw = self.redis.get(_k("run", run, "config"))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}: create it with 'coordinator init --run {run}'")
        return msgpack.unpackb(raw)

    def runs(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(_k("runs")))

    def version(self, run: str) -> int:
        raw = self.redis.get(_k("run", run, "version"))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}")
        return int(raw)

    def model_blob(self, run: str, version: int) -> bytes | None:
        return self.redis.get(_k("run", run, "model", version))

    def strategy_blob(self, run: str) -> bytes | None:
        return self.redis.get(_k("run", run, "strategy"))

    def stage_model(self, run: str, version: int, owner: str, blob: bytes) -> str:
        """Write a candidate model under a private key; ``finish_round`` publishes it."""
        key = _k("run", run, "staged", version, owner)
        self.redis.set(key, blob, ex=3600)
        return key

    # --- rounds ------------------------------------------------------------
    def open_round(self, run: str, shards: int, quorum: int, deadline: float) -> dict[str, Any]:
        """Number and record a new round on the current version."""
        current = self.current_round(run)
        if current is not None and current["status"] in ("open", "aggregating"):
            raise RoundOpen(
                f"run {run!r} has round {current['round']} in progress; "
                "wait for it (post-round --wait) or let its deadline pass")
        number = int(self.redis.incr(_k("run", run, "rounds")))
        now = time.time()
        fields = dict(status="open", shards=shards, quorum=quorum, deadline=now + deadline,
                      base_version=self.version(run), posted_at=now, accepted=0, rejected=0,
                      late=0, uplink_bytes=0, downlink_bytes=0, claim_until=0)
        pipe = self.redis.pipeline()
        pipe.hset(_round(run, number), mapping=fields)
        pipe.zadd(_k("deadlines"), {f"{run}|{number}": now + deadline})
        pipe.execute()
        return {"round": number, **fields}

    def round_count(self, run: str) -> int:
        return int(self.redis.get(_k("run", run, "rounds")) or 0)

    def round_info(self, run: str, number: int) -> dict[str, Any] | None:
        raw = self.redis.hgetall(_round(run, number))
        if not raw:
            return None
        info: dict[str, Any] = {"round": number}
        for key, value in raw.items():
            info[key.decode()] = _number_or_text(value.decode())
        return info

    def current_round(self, run: str) -> dict[str, Any] | None:
        number = self.round_count(run)
        return self.round_info(run, number) if number else None

    def round_status(self, run: str, number: int) -> str | None:
        raw = self.redis.hget(_round(run, number), "status")
        return raw.decode() if raw is not None else None

    def add_round_bytes(self, run: str, number: int, field: str, count: int) -> None:
        self.redis.hincrby(_round(run, number), field, count)

    def accepted_uploads(self, run: str, number: int) -> dict[int, str]:
        raw = self.redis.hgetall(_round(run, number) + ":accepted")
        return {int(k): v.decode() for k, v in raw.items()}

    def rejections(self, run: str, number: int) -> list[dict[str, Any]]:
        raw = self.redis.hvals(_round(run, number) + ":rejections")
        return sorted((json.loads(x) for x in raw), key=lambda r: (r["shard"], r["volunteer"]))

    def due_rounds(self, now: float | None = None) -> list[tuple[str, int]]:
        """Unfinished rounds an aggregator should take now.

        Past their deadline, open with their quorum met, or held by an
        aggregator whose claim ran out (it died): the same test as ``claim``.
        """
        now = time.time() if now is None else now
        members = [m.decode() for m in self.redis.zrange(_k("deadlines"), 0, -1)]
        pipe = self.redis.pipeline()
        for member in members:
            run, _, number = member.rpartition("|")
            pipe.hmget(_round(run, int(number)), "status", "accepted", "quorum", "deadline", "claim_until")
        due = []
        for member, (status, accepted, quorum, deadline, claim_until) in zip(members, pipe.execute()):
            run, _, number = member.rpartition("|")
            quorum_or_deadline = int(accepted) >= int(quorum) or float(deadline) <= now
            abandoned = status == b"aggregating" and float(claim_until) <= now
            if (status == b"open" and quorum_or_deadline) or abandoned:
                due.append((run, int(number)))
        return due

    # --- uploads -----------------------------------------------------------
    def upload_key(self, volunteer: str, run: str, number: int, shard: int, token: str) -> str:
        """Uploads live under the volunteer's own prefix, which its ACL user may write."""
        return _k("upload", volunteer, run, number, shard, token)

    def put_upload(self, key: str, blob: bytes) -> None:
        self.redis.set(key, blob, ex=UPLOAD_TTL)

    def get_upload(self, key: str) -> bytes | None:
        return self.redis.get(key)

    def accept(self, run: str, number: int, shard: int, upload_key: str) -> tuple[str, bool]:
        """Count a validated delta once.

        Returns the outcome ('accepted', 'repeat', 'duplicate' or 'late') and
        whether the round is now due for aggregation (open, quorum met).
        """
        key = _round(run, number)
        outcome, due = self._accept(keys=[key, key + ":accepted"], args=[shard, upload_key])
        return outcome.decode(), bool(due)

    def reject(self, run: str, number: int, shard: int, volunteer: str, reason: str,
               upload: str = "") -> str:
        """Record why a shard's result was refused: 'rejected', 'repeat', 'duplicate' or 'late'."""
        key = _round(run, number)
        entry = json.dumps({"shard": shard, "volunteer": volunteer, "reason": reason})
        return self._reject(keys=[key, key + ":rejections", key + ":accepted"],
                            args=[shard, entry, f"{shard}|{volunteer}|{upload}"]).decode()

    def reject_claimed(self, run: str, number: int, shard: int, volunteer: str, reason: str) -> None:
        """Record a rejection decided during aggregation (the round is no longer open)."""
        entry = json.dumps({"shard": shard, "volunteer": volunteer, "reason": reason})
        self.redis.hset(_round(run, number) + ":rejections", f"{shard}|{volunteer}|aggregation", entry)

    # --- aggregation -------------------------------------------------------
    def claim(self, run: str, number: int, owner: str, lease: float = CLAIM_LEASE) -> bool:
        """Take the round for aggregation if its quorum or deadline is reached."""
        return bool(self._claim(keys=[_round(run, number)], args=[owner, time.time(), lease]))

    def renew_claim(self, run: str, number: int, owner: str, lease: float = CLAIM_LEASE) -> bool:
        """Extend our claim while a long aggregation is still working."""
        return bool(self._renew(keys=[_round(run, number)], args=[owner, time.time() + lease]))

    def finish_round(self, run: str, number: int, owner: str, base_version: int,
                     summary: dict[str, Any], staged_key: str | None,
                     strategy_blob: bytes = b"") -> bool:
        """Publish the staged model as base+1 (or mark the round failed), exactly once."""
        status = "done" if staged_key else "failed"
        keys = [_k("run", run, "version"), staged_key or "", _k("run", run, "model", base_version + 1),
                _round(run, number), _k("run", run, "strategy"), _k("deadlines")]
        ok = bool(self._commit(keys=keys, args=[base_version, owner, json.dumps(summary),
                                                strategy_blob, f"{run}|{number}", status]))
        if ok:
            self._expire_round(run, number)
        return ok

    def _expire_round(self, run: str, number: int) -> None:
        key = _round(run, number)
        uploads = list(self.accepted_uploads(run, number).values())
        pipe = self.redis.pipeline()
        if uploads:
            pipe.delete(*uploads)
        for suffix in ("", ":accepted", ":rejections"):
            pipe.expire(key + suffix, ROUND_TTL)
        pipe.execute()

    # --- volunteers --------------------------------------------------------
    def credit(self, volunteer: str, **counts: int) -> None:
        """Add to a volunteer's credit (shards_done, samples, accepted, rejected)."""
        key = _k("volunteer", volunteer)
        pipe = self.redis.pipeline()
        pipe.sadd(_k("volunteers"), volunteer)
        for field, count in counts.items():
            pipe.hincrby(key, field, count)
        pipe.execute()

    def describe_volunteer(self, volunteer: str, device: str) -> None:
        self.redis.sadd(_k("volunteers"), volunteer)
        self.redis.hset(_k("volunteer", volunteer), mapping={"device": device})

    def volunteers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in sorted(n.decode() for n in self.redis.smembers(_k("volunteers"))):
            raw = self.redis.hgetall(_k("volunteer", name))
            out[name] = {k.decode(): _number_or_text(v.decode()) for k, v in raw.items()}
        return out

    def queue_depths(self, queues: tuple[str, ...]) -> dict[str, int]:
        return {q: int(self.redis.llen(q)) for q in queues}


def _k(*parts: Any) -> str:
    return ":".join([PREFIX, *(str(p) for p in parts)])


def _round(run: str, number: int) -> str:
    return _k("run", run, "round", number)


def _number_or_text(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
