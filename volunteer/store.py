"""The volunteer's view of Redis: the handful of reads it needs and its own uploads.

Everything here is allowed by the least-privilege ACL user that
``coordinator volunteer-credentials`` makes (read ``ct:run:*``, write
``ct:upload:NAME:*``, append to ``ct:announce``); no Lua, nothing of the
coordinator. Models, updates and uploads are chunk lists (``broker.blobs``). Its record and
credit are written by the aggregator, from what its uploads show.
"""

from __future__ import annotations

from typing import Any

import msgpack
import redis

from broker import blobs, keys
from broker.errors import UnknownRun
from broker.objects import Pointer, UrlReader, send_to_slot
from serialization import Encoded


class VolunteerStore:
    """Reads a run's settings, round status and model versions; writes this volunteer's uploads."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.redis = client
        self.name = name
        self._urls = UrlReader()  # a run with a blob store: its pointers carry presigned GET URLs

    def run_config(self, run: str) -> dict[str, Any]:
        raw = self.redis.get(keys.run_config(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}")
        config: dict[str, Any] = msgpack.unpackb(raw)
        return config

    def round_info(self, run: str, number: int) -> dict[str, Any] | None:
        """The round's status, shard count and base version; None if there is no such round."""
        status, shards, base = self.redis.hmget(keys.round_(run, number), "status", "shards", "base_version")
        if status is None:
            return None
        return {
            "status": status.decode(),
            "shards": int(shards) if shards is not None else None,
            "base_version": int(base) if base is not None else None,
        }

    def version(self, run: str) -> int | None:
        """The run's current model version (None for an unknown run)."""
        raw = self.redis.get(keys.run_version(run))
        return int(raw) if raw is not None else None

    def model_blob(self, run: str, version: int) -> bytearray | None:
        return blobs.read(self.redis, keys.model(run, version), remote=self._urls)

    def update_blobs(self, run: str, versions: range) -> list[bytearray | None]:
        """The encoded updates that make each of ``versions`` from the one before (lossy downlink)."""
        return [blobs.read(self.redis, keys.update(run, v), remote=self._urls) for v in versions]

    def put_upload(
        self,
        run: str,
        number: int,
        shard: int,
        token: str,
        blob: bytes | Encoded,
        slot: dict[str, Any] | None = None,
    ) -> str:
        """Store one upload under this volunteer's own key prefix and announce it; returns its key.

        One round trip, in one transaction: the aggregator never finds an
        announcement before its upload. The announcement is only a hint (the
        key's prefix, which only this volunteer may write, says whose it is).
        With a blob-store ``slot`` the bytes go to its presigned URL first, and
        the key holds a pointer to them (name, size, sha256).
        """
        key = keys.upload(self.name, run, number, shard, token)

        def announce(pipe: redis.client.Pipeline) -> None:
            pipe.rpush(keys.announcements(), key)

        if slot is None:
            blobs.write(self.redis, key, blob, ttl=keys.UPLOAD_TTL, also=announce)
            return key
        size, digest = send_to_slot(slot, blob)
        blobs.write_pointer(self.redis, key, Pointer(slot["object"], size, digest), keys.UPLOAD_TTL, announce)
        return key
