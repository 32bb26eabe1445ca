"""The trusted side's view of Redis: runs, model versions, uploads, credit, queues.

Round state lives in ``coordinator.state`` (``Store.rounds``); the key layout in
``broker.keys``. Volunteers never use this module: theirs is ``volunteer.store``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import redis

from broker import keys
from broker.errors import UnknownRun
from coordinator.errors import RunExists
from coordinator.state import RoundState, lua_source, number_or_text


class Store:
    """Typed access to crowdtrain's keys on one Redis server, for the coordinator and aggregator."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.rounds = RoundState(client)
        self._drain = client.register_script(lua_source("drain"))

    # --- runs and versions ---------------------------------------------------
    def create_run(self, run: str, config: dict[str, Any], model_blob: bytes) -> None:
        """Create a run with model version 0; refuses to overwrite one."""
        if not self.redis.set(keys.run_config(run), msgpack.packb(config), nx=True):
            raise RunExists(f"run {run!r} exists already; choose another --run name")
        pipe = self.redis.pipeline()
        pipe.set(keys.model(run, 0), model_blob)
        pipe.set(keys.run_version(run), 0)
        pipe.sadd(keys.runs(), run)
        pipe.execute()

    def run_config(self, run: str) -> dict[str, Any]:
        """The run's settings, as ``coordinator init`` stored them."""
        raw = self.redis.get(keys.run_config(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}: create it with 'coordinator init --run {run}'")
        config: dict[str, Any] = msgpack.unpackb(raw)
        return config

    def runs(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(keys.runs()))

    def version(self, run: str) -> int:
        raw = self.redis.get(keys.run_version(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}")
        return int(raw)

    def model_blob(self, run: str, version: int) -> bytes | None:
        blob: bytes | None = self.redis.get(keys.model(run, version))
        return blob

    def strategy_blob(self, run: str) -> bytes | None:
        blob: bytes | None = self.redis.get(keys.strategy(run))
        return blob

    def stage_model(self, run: str, version: int, owner: str, blob: bytes) -> str:
        """Write a candidate model under a private key; ``rounds.commit`` publishes it."""
        key = keys.staged_model(run, version, owner)
        self.redis.set(key, blob, ex=keys.STAGED_TTL)
        return key

    def stage_update(self, run: str, version: int, owner: str, update: bytes, residual: bytes) -> None:
        """Write a candidate version's downlink update and residual; ``rounds.commit`` publishes both."""
        pipe = self.redis.pipeline()
        pipe.set(keys.staged_update(run, version, owner), update, ex=keys.STAGED_TTL)
        pipe.set(keys.staged_residual(run, owner), residual, ex=keys.STAGED_TTL)
        pipe.execute()

    def downlink_residual(self, run: str) -> bytes | None:
        blob: bytes | None = self.redis.get(keys.downlink_residual(run))
        return blob

    def prune_versions(self, run: str, current: int, keep: int = keys.KEEP_VERSIONS) -> None:
        """Drop model versions (and their updates) older than the latest ``keep`` from Redis.

        They stay on disk; a volunteer whose base is older fetches the whole model.
        """
        old = current - keep
        if old >= 0:
            span = range(max(0, old - 8), old + 1)
            self.redis.delete(*(keys.model(run, v) for v in span), *(keys.update(run, v) for v in span))

    def dp_clip(self, run: str) -> float | None:
        """The adaptive clip C of a DP run, once a merge has moved it (None before)."""
        raw = self.redis.get(keys.dp_clip(run))
        return float(raw) if raw is not None else None

    def set_dp_clip(self, run: str, clip: float) -> None:
        self.redis.set(keys.dp_clip(run), repr(float(clip)))

    # --- uploads -------------------------------------------------------------
    def upload_size(self, key: str) -> int:
        """Bytes stored under ``key`` (0 if absent), known before anything is downloaded."""
        return int(self.redis.strlen(key))

    def upload_sizes(self, upload_keys: Sequence[str]) -> list[int]:
        """``upload_size`` of each key, in one round trip."""
        if not upload_keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in upload_keys:
            pipe.strlen(key)
        return [int(size) for size in pipe.execute()]

    def get_upload(self, key: str) -> bytes | None:
        blob: bytes | None = self.redis.get(key)
        return blob

    def get_uploads(self, upload_keys: Sequence[str]) -> list[bytes | None]:
        """Each key's bytes (None where absent), in one round trip."""
        if not upload_keys:
            return []
        blobs: list[bytes | None] = self.redis.mget(upload_keys)
        return blobs

    def take_upload(self, key: str, trusted_key: str) -> bytes | None:
        """Move an upload where no volunteer can write (keys.accepted_upload), then read it."""
        pipe = self.redis.pipeline()
        pipe.rename(key, trusted_key)
        pipe.expire(trusted_key, keys.UPLOAD_TTL)
        pipe.get(trusted_key)
        try:
            blob: bytes | None = pipe.execute()[-1]
        except redis.ResponseError:  # "no such key": it expired or was deleted meanwhile
            return None
        return blob

    def take_uploads(
        self,
        moves: Sequence[tuple[str, str]],
        counts: Sequence[tuple[str, int, str, int]] = (),
        discard: Sequence[str] = (),
    ) -> list[bytes | None]:
        """``take_upload`` for each (key, trusted key) in ``moves``, in one round trip; the blobs.

        First the ``counts`` are added to their rounds (run, round, field, count);
        last the ``discard`` keys are deleted. A move whose upload went meanwhile
        reads None.
        """
        pipe = self.redis.pipeline(transaction=False)
        for run, number, field, count in counts:
            pipe.hincrby(keys.round_(run, number), field, count)
        for key, trusted_key in moves:
            pipe.rename(key, trusted_key)
            pipe.expire(trusted_key, keys.UPLOAD_TTL)
            pipe.get(trusted_key)
        if discard:
            pipe.delete(*discard)
        replies = pipe.execute(raise_on_error=False)
        blobs: list[bytes | None] = []
        for index, reply in enumerate(replies):
            first_move = index - len(counts)
            if 0 <= first_move < 3 * len(moves) and first_move % 3 == 0:
                blob = replies[index + 2]
                # "no such key": the upload expired or was deleted meanwhile, and nothing was moved
                gone = isinstance(reply, redis.ResponseError) and "no such key" in str(reply).lower()
                blobs.append(None if gone or not isinstance(blob, bytes) else blob)
                if gone:
                    continue
            if isinstance(reply, Exception):
                raise reply
        return blobs

    def announce(self, *upload_keys: str) -> None:
        """Put uploads on the announcement list, as their volunteers did (the watcher's recovery)."""
        if upload_keys:
            self.redis.rpush(keys.announcements(), *upload_keys)

    def take_announcements(self, count: int, longest: int, cap: int) -> tuple[int, list[bytes]]:
        """Up to ``count`` announcements, oldest first, and how many were dropped (``lua/drain.lua``).

        Entries longer than ``longest`` bytes are dropped unread, and entries
        beyond the list's ``cap`` (the newest) are dropped too.
        """
        dropped, entries = self._drain(keys=[keys.announcements()], args=[count, longest, cap])
        return int(dropped), list(entries)

    def delete_upload(self, *upload_keys: str) -> None:
        if upload_keys:
            self.redis.delete(*upload_keys)

    # --- volunteers and queues ----------------------------------------------
    def credit(
        self,
        volunteer: str,
        device: str | None = None,
        seconds: float = 0.0,
        memory_gb: int | None = None,
        **counts: int,
    ) -> None:
        """Add to a volunteer's record (shards_done, samples, accepted, rejected); trusted side only."""
        pipe = self.redis.pipeline()
        pipe.sadd(keys.volunteers(), volunteer)
        if device:
            pipe.hset(keys.volunteer(volunteer), "device", device)
        if memory_gb:
            pipe.hset(keys.volunteer(volunteer), "memory_gb", memory_gb)
        if seconds:
            pipe.hincrbyfloat(keys.volunteer(volunteer), "train_seconds", seconds)
        for field, count in counts.items():
            pipe.hincrby(keys.volunteer(volunteer), field, count)
        pipe.execute()

    def reputations(self, names: list[str]) -> dict[str, float | None]:
        """Each volunteer's reputation (``--verify probe``); None for one never judged."""
        pipe = self.redis.pipeline()
        for name in names:
            pipe.hget(keys.volunteer(name), "reputation")
        return {name: float(raw) if raw is not None else None for name, raw in zip(names, pipe.execute())}

    def set_reputations(self, values: dict[str, float]) -> None:
        pipe = self.redis.pipeline()
        for name, value in values.items():
            pipe.sadd(keys.volunteers(), name)
            pipe.hset(keys.volunteer(name), "reputation", repr(round(float(value), 6)))
        pipe.execute()

    def volunteers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in sorted(n.decode() for n in self.redis.smembers(keys.volunteers())):
            raw = self.redis.hgetall(keys.volunteer(name))
            out[name] = {k.decode(): number_or_text(v.decode()) for k, v in raw.items()}
        return out

    def queue_depths(self, routed: list[str] | tuple[str, ...] = ()) -> dict[str, int]:
        """Messages waiting on ``train`` and ``aggregate``, and on the ``routed`` queues named."""
        return {queue: int(self.redis.llen(queue)) for queue in (*keys.QUEUES, *routed)}
