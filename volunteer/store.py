"""The volunteer's view of Redis: the handful of reads it needs and its own uploads.

Everything here is allowed by the least-privilege ACL user that
``coordinator volunteer-credentials`` makes (read ``ct:run:*``, write
``ct:upload:NAME:*`` and its own record); no Lua, nothing of the coordinator.
"""

from __future__ import annotations

from typing import Any

import msgpack
import redis

from broker import keys
from broker.errors import UnknownRun


class VolunteerStore:
    """Reads a run's settings, round status and model versions; writes this volunteer's uploads."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.redis = client
        self.name = name

    def run_config(self, run: str) -> dict[str, Any]:
        raw = self.redis.get(keys.run_config(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}")
        config: dict[str, Any] = msgpack.unpackb(raw)
        return config

    def round_status(self, run: str, number: int) -> str | None:
        raw = self.redis.hget(keys.round_(run, number), "status")
        return raw.decode() if raw is not None else None

    def model_blob(self, run: str, version: int) -> bytes | None:
        blob: bytes | None = self.redis.get(keys.model(run, version))
        return blob

    def put_upload(self, run: str, number: int, shard: int, token: str, blob: bytes) -> str:
        """Store one upload under this volunteer's own key prefix; returns its key."""
        key = keys.upload(self.name, run, number, shard, token)
        self.redis.set(key, blob, ex=keys.UPLOAD_TTL)
        return key

    def describe(self, device: str) -> None:
        """Register this volunteer and the device it trains on."""
        pipe = self.redis.pipeline()
        pipe.sadd(keys.volunteers(), self.name)
        pipe.hset(keys.volunteer(self.name), mapping={"device": device})
        pipe.execute()
