"""The volunteer's view of Redis: the handful of reads it needs and its own uploads.

Everything here is allowed by the least-privilege ACL user that
``coordinator volunteer-credentials`` makes (read ``ct:run:*``, write
``ct:upload:NAME:*``, append to ``ct:announce``, ``ct:asks`` and its own
``ct:ask:NAME``, read its own ``ct:grant:NAME:*``); no Lua, nothing of the
coordinator. Models, updates and uploads are chunk lists (``broker.blobs``). Its record and
credit are written by the aggregator, from what its uploads show.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import redis

from broker import blobs, keys
from broker.errors import UnknownRun
from broker.pointers import Pointer
from broker.renewal import renewing
from broker.run_config import RunConfig
from broker.transfer import UrlReader, send_to_slot
from serialization import Encoded

log = logging.getLogger("crowdtrain.volunteer")

# How long a volunteer waits for the answer to a lease request before it drops the shard untrained.
GRANT_WAIT = 30  # (under the client's 60 s socket timeout)
ASK_AGAIN = 5  # seconds without an answer before the same lease request is sent again


class VolunteerStore:
    """Reads a run's settings, round status and model versions; writes this volunteer's uploads."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.redis = client
        self.name = name
        self._urls = UrlReader()  # a run with a blob store: its pointers carry presigned GET URLs

    def run_config(self, run: str) -> RunConfig:
        raw = self.redis.get(keys.run_config(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}")
        return RunConfig.from_stored(msgpack.unpackb(raw))

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

    def lease(self, run: str, number: int, shard: int, wait: float = GRANT_WAIT) -> dict[str, Any]:
        """Ask the trusted side for a shard's lease; its answer, or a refusal when none came in ``wait`` s.

        A granted answer holds the upload ``token``, the ``base_version`` to
        train on, the lease's ``seconds`` and, for a run with a blob store, the
        ``upload`` slot (which nobody else can read).
        """
        nonce = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        reply = None
        try:
            # The same request again every ASK_AGAIN s without an answer: a request or its answer
            # lost with a Redis primary that died (Sentinel failover) costs seconds, not the wait.
            while reply is None and (left := deadline - time.monotonic()) > 0:
                pipe = self.redis.pipeline(transaction=True)
                pipe.rpush(keys.lease_inbox(self.name), keys.lease_request(run, number, shard, nonce))
                pipe.rpush(keys.lease_requests(), self.name)
                pipe.execute()
                reply = self.redis.blpop(
                    [keys.grant(self.name, nonce)], timeout=max(1, round(min(ASK_AGAIN, left)))
                )
        except redis.ResponseError as e:  # a user made before leases: NOPERM (docs/DEPLOYMENT.md)
            return {"granted": False, "reason": f"the lease request was refused: {e}"}
        if reply is None:
            return {"granted": False, "reason": f"no answer to the lease request in {wait}s"}
        answer: dict[str, Any] = msgpack.unpackb(reply[1])
        return answer

    @contextlib.contextmanager
    def renewing(
        self, run: str, number: int, shard: int, token: Callable[[], str | None], seconds: float
    ) -> Iterator[None]:
        """Renew a lease every third of its ``seconds`` until the block ends (the shard trains).

        ``token()`` is the lease's token now: a shard leased again after a pause
        has a new one, and a released lease (None) is not renewed.
        """

        def renew() -> bool:
            held = token()
            if held is None:
                return True
            try:
                self._tell(keys.lease_request(run, number, shard, held, "renew"))
            except redis.RedisError as e:  # the lease covers short blips
                log.warning("could not renew the lease of %s round %d shard %d: %s", run, number, shard, e)
            return True

        with renewing(max(0.5, seconds / 3), renew, "lease-renewal"):
            yield

    def release(self, run: str, number: int, shard: int, token: str) -> bool:
        """Give a lease back (a long pause): the trusted side offers the shard again at once."""
        try:
            self._tell(keys.lease_request(run, number, shard, token, "release"))
        except redis.RedisError as e:  # it lapses by itself, a lease later
            log.warning("could not release the lease of %s round %d shard %d: %s", run, number, shard, e)
            return False
        return True

    def credit(self) -> dict[str, Any]:
        """This volunteer's record as the trusted side counted it; empty where its user may not read it."""
        fields = ("shards_done", "samples", "accepted", "rejected", "reputation")
        try:
            values = self.redis.hmget(keys.volunteer(self.name), fields)
        except redis.RedisError:  # a user made before it could read its own record
            return {}
        return {k: v.decode() for k, v in zip(fields, values, strict=True) if v is not None}

    def _tell(self, entry: str) -> None:
        """Append one entry to this volunteer's lease requests, and its name to the hints."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(keys.lease_inbox(self.name), entry)
        pipe.rpush(keys.lease_requests(), self.name)
        pipe.execute()

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
