"""The trusted side's view of Redis: runs, model versions, uploads, credit, queues.

Round state lives in ``coordinator.rounds.state`` (``Store.rounds``); the key layout in
``broker.keys``. Volunteers never use this module: theirs is ``volunteer.store``.
A run made with ``init --blob-store`` keeps its blobs as objects (``broker.objects``):
this store writes them there and follows the pointers Redis holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import msgpack
import redis

from broker import blobs, keys
from broker.errors import UnknownRun
from broker.objects import RENEW_BEFORE, S3_LARGEST_POST, Location, ObjectMismatch, ObjectStore, Pointer
from broker.run_config import RunConfig
from coordinator.errors import RunExists
from coordinator.rounds.state import RoundState, lua_source, number_or_text
from coordinator.runs.ledger import Ledger
from serialization import Encoded, TensorDict, loads, loads_some

# Unreferenced objects of a run are looked for at most this often (a listing of its prefix).
SWEEP_SECONDS = 600
# Merged rounds whose voice norm the norm screen of small rounds remembers (its yardstick is their median).
NORM_HISTORY = 16


class Store:
    """Typed access to crowdtrain's keys on one Redis server, for the coordinator and aggregator."""

    def __init__(self, client: redis.Redis, ledger: Ledger | None = None) -> None:
        self.redis = client
        self.ledger = ledger  # the trusted side's record of credit on disk, written with Redis's
        self.rounds = RoundState(client)
        self._drain = client.register_script(lua_source("drain"))
        self._objects: dict[str, ObjectStore | None] = {}
        self._slot_sizes: dict[str, int] = {}  # the most bytes one upload slot of a run takes
        self._swept: dict[str, float] = {}
        self._lock = threading.Lock()

    # --- the object store ----------------------------------------------------
    def objects(self, run: str) -> ObjectStore | None:
        """The object store ``run``'s blobs live in (``init --blob-store``); None for Redis."""
        with self._lock:
            if run not in self._objects:
                config = self.run_config(run)
                url = config.blob_store
                self._objects[run] = ObjectStore(Location.parse(url)) if url else None
                self._slot_sizes[run] = config.upload_bound or S3_LARGEST_POST
            return self._objects[run]

    def fetch(self, pointer: Pointer, key: str, limit: int | None) -> bytearray:
        """Follow a pointer under ``key`` into its run's object store (``blobs.Remote``)."""
        origin = keys.upload_origin(key)
        run = origin[0] if origin is not None else keys.run_of(key)
        store = self.objects(run) if run is not None else None
        if store is None:
            raise ObjectMismatch(f"{key} holds a pointer, but its run keeps no blob store")
        return store.fetch(pointer, key, limit)

    def upload_slot(self, run: str, number: int, shard: int) -> dict[str, Any] | None:
        """Where one job of ``run`` uploads (an object and its presigned POST); None without a store.

        The POST's policy caps the object at the run's upload bound, recorded by ``init``.
        """
        store = self.objects(run)
        return store.upload_slot(run, number, shard, self._slot_sizes[run]) if store is not None else None

    def renew_urls(self, run: str, current: int, keep: int = keys.KEEP_VERSIONS) -> None:
        """Sign the GET URLs of the kept versions and updates again, if they expire soon.

        Called when work is posted, so a run idle for days still serves its model.
        """
        store = self.objects(run)
        if store is None:
            return
        for version in range(max(0, current - keep + 1), current + 1):
            for key in (keys.model(run, version), keys.update(run, version)):
                self.redis.transaction(lambda pipe, key=key: self._renew(pipe, key, store), key)

    def _renew(self, pipe: redis.client.Pipeline, key: str, store: ObjectStore) -> None:
        pointer = blobs.read_pointer(pipe, key)  # WATCHed: a prune meanwhile cancels the rewrite
        if pointer is None or pointer.expires - time.time() > RENEW_BEFORE:
            return
        pipe.multi()
        blobs.queue_write(pipe, key, store.signed(pointer).pack(), magic=blobs.POINTER_MAGIC)

    def _write(
        self, run: str, key: str, blob: bytes | Encoded, ttl: int | None = None, readable: bool = True
    ) -> None:
        """Write a trusted blob of ``run``: to its object store if it has one (Redis keeps the pointer)."""
        store = self.objects(run)
        if store is None:
            blobs.write(self.redis, key, blob, ttl=ttl)
        else:
            blobs.write_pointer(self.redis, key, store.put(run, blob, readable), ttl=ttl)

    def restore_blob(self, run: str, key: str, blob: bytes, readable: bool = True) -> None:
        """Write a blob of ``run`` rebuilt from its disk record (``coordinator.runs.restore``)."""
        self._write(run, key, blob, readable=readable)

    def _read(self, key: str, limit: int | None = None) -> bytearray | None:
        return blobs.read(self.redis, key, limit, remote=self)

    # --- runs and versions ---------------------------------------------------
    def create_run(self, run: str, config: RunConfig, model_blob: bytes) -> None:
        """Create a run with model version 0; refuses to overwrite one."""
        if not self.redis.set(keys.run_config(run), msgpack.packb(config.stored()), nx=True):
            raise RunExists(f"run {run!r} exists already; choose another --run name")
        self._write(run, keys.model(run, 0), model_blob)
        pipe = self.redis.pipeline()
        pipe.set(keys.run_version(run), 0)
        pipe.sadd(keys.runs(), run)
        pipe.execute()

    def run_config(self, run: str) -> RunConfig:
        """The run's settings, as ``coordinator init`` stored them."""
        raw = self.redis.get(keys.run_config(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}: create it with 'coordinator init --run {run}'")
        return RunConfig.from_stored(msgpack.unpackb(raw))

    def runs(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(keys.runs()))

    def version(self, run: str) -> int:
        raw = self.redis.get(keys.run_version(run))
        if raw is None:
            raise UnknownRun(f"unknown run {run!r}")
        return int(raw)

    def model_blob(self, run: str, version: int) -> bytearray | None:
        return self._read(keys.model(run, version))

    def strategy_blob(self, run: str) -> bytearray | None:
        return self._read(keys.strategy(run))

    def model_part(self, run: str, version: int, names: Collection[str]) -> TensorDict | None:
        """Tensors ``names`` of a model version, read chunk by chunk: memory for them alone."""
        wanted = set(names)
        return self._read_part(keys.model(run, version), wanted.__contains__)

    def strategy_part(self, run: str, names: Collection[str]) -> TensorDict:
        """The strategy state of tensors ``names`` (entries ``KIND/NAME``), read as ``model_part`` reads."""
        wanted = set(names)
        return self._read_part(keys.strategy(run), lambda key: key.partition("/")[2] in wanted) or {}

    def _read_part(self, key: str, keep: Callable[[str], bool]) -> TensorDict | None:
        stream = blobs.read_stream(self.redis, key)
        if stream is None:  # none there, or a blob behind a pointer (object store): read whole
            blob = self._read(key)
            return None if blob is None else {k: v for k, v in loads(blob)[0].items() if keep(k)}
        return loads_some(stream[1], stream[0], keep)

    def stage_model(self, run: str, version: int, owner: str, blob: bytes | Encoded) -> str:
        """Write a candidate model under a private key; ``rounds.commit`` publishes it."""
        key = keys.staged_model(run, version, owner)
        self._write(run, key, blob, ttl=keys.STAGED_TTL)
        return key

    def stage_strategy(self, run: str, owner: str, blob: bytes | Encoded) -> None:
        """Write the strategy's state after a candidate version; ``rounds.commit`` publishes it."""
        self._write(run, keys.staged_strategy(run, owner), blob, ttl=keys.STAGED_TTL, readable=False)

    def stage_slice(self, run: str, key: str, blob: bytes | Encoded) -> None:
        """Write a merged slice of a sliced round (``coordinator.merging.split``) for its commit."""
        self._write(run, key, blob, ttl=keys.STAGED_TTL, readable=False)

    def staged_slice(self, key: str) -> bytearray | None:
        return self._read(key)

    def stage_update(
        self, run: str, version: int, owner: str, update: bytes | Encoded, residual: bytes | Encoded
    ) -> None:
        """Write a candidate version's downlink update and residual; ``rounds.commit`` publishes both."""
        self._write(run, keys.staged_update(run, version, owner), update, ttl=keys.STAGED_TTL)
        self._write(run, keys.staged_residual(run, owner), residual, ttl=keys.STAGED_TTL, readable=False)

    def downlink_residual(self, run: str) -> bytearray | None:
        return self._read(keys.downlink_residual(run))

    def prune_versions(self, run: str, current: int, keep: int = keys.KEEP_VERSIONS) -> None:
        """Drop model versions (and their updates) older than the latest ``keep`` from Redis.

        They stay on disk; a volunteer whose base is older fetches the whole model.
        """
        old = current - keep
        if old >= 0:
            span = range(max(0, old - 8), old + 1)
            self.redis.delete(*(keys.model(run, v) for v in span), *(keys.update(run, v) for v in span))
        self.sweep_objects(run, current, keep)

    def sweep_objects(self, run: str, current: int, keep: int, force: bool = False) -> int:
        """Delete ``run``'s objects no pointer names any more (at most every SWEEP_SECONDS); how many went.

        A blob younger than a staged version's lifetime may be about to be
        published, and an upload younger than an upload's lifetime may still be
        read: both are left for a later sweep.
        """
        store = self.objects(run)
        if store is None or (not force and time.time() - self._swept.get(run, 0.0) < SWEEP_SECONDS):
            return 0
        self._swept[run] = time.time()
        live = [keys.strategy(run), keys.downlink_residual(run)]
        for version in range(max(0, current - keep + 1), current + 1):
            live += [keys.model(run, version), keys.update(run, version)]
        named = [blobs.read_pointer(self.redis, key) for key in live]
        kept = [pointer.object for pointer in named if pointer is not None]
        return store.sweep(run, kept, blobs_older=keys.STAGED_TTL, uploads_older=keys.UPLOAD_TTL + 3600)

    def dp_clip(self, run: str) -> float | None:
        """The adaptive clip C of a DP run, once a merge has moved it (None before)."""
        raw = self.redis.get(keys.dp_clip(run))
        return float(raw) if raw is not None else None

    def set_dp_clip(self, run: str, clip: float) -> None:
        self.redis.set(keys.dp_clip(run), repr(float(clip)))

    def voice_norms(self, run: str) -> list[float]:
        """The norms that recent merged rounds added (``add_voice_norm``), newest first."""
        return [float(raw) for raw in self.redis.lrange(keys.voice_norms(run), 0, NORM_HISTORY - 1)]

    def add_voice_norm(self, run: str, norm: float) -> None:
        """Remember one merged round's voice norm; only the last ``NORM_HISTORY`` are kept."""
        pipe = self.redis.pipeline()
        pipe.lpush(keys.voice_norms(run), repr(float(norm)))
        pipe.ltrim(keys.voice_norms(run), 0, NORM_HISTORY - 1)
        pipe.execute()

    # --- uploads -------------------------------------------------------------
    def upload_sizes(self, upload_keys: Sequence[str]) -> list[tuple[int, int]]:
        """(declared, stored) bytes under each key, (0, 0) if absent, in one round trip.

        ``declared`` is the volunteer's word (its blob header); ``stored`` what
        Redis holds for it, overhead included (``blobs.sizes_many``): both are
        known before a chunk is read.
        """
        return blobs.sizes_many(self.redis, upload_keys)

    def get_upload(self, key: str, limit: int | None = None) -> bytearray | None:
        """An upload's payload; BlobError if it is no well-formed blob or declares over ``limit`` bytes."""
        return self._read(key, limit)

    def read_uploads(
        self, upload_keys: Sequence[str], limits: Sequence[int]
    ) -> list[bytearray | blobs.BlobError | None]:
        """Each key's payload, None (absent) or the BlobError refusing it, in a few round trips."""
        return blobs.read_many(self.redis, upload_keys, limits, remote=self)

    def get_uploads(self, upload_keys: Sequence[str], limit: int | None = None) -> list[bytearray | None]:
        """Each key's payload (None where absent), in a few round trips; BlobError if one is malformed."""
        out: list[bytearray | None] = []
        for blob in blobs.read_many(self.redis, upload_keys, [limit] * len(upload_keys), remote=self):
            if isinstance(blob, blobs.BlobError):
                raise blob
            out.append(blob)
        return out

    def take_upload(self, key: str, trusted_key: str, limit: int) -> bytearray | None:
        """Move an upload where no volunteer can reach (keys.accepted_upload), then read it.

        None if it went meanwhile (expired or deleted); BlobError if the moved
        copy is larger than ``limit`` or no well-formed blob.
        """
        (blob,) = self.take_uploads([(key, trusted_key, limit)])
        if isinstance(blob, blobs.BlobError):
            raise blob
        return blob

    def take_uploads(
        self,
        moves: Sequence[tuple[str, str, int]],
        counts: Sequence[tuple[str, int, str, int]] = (),
        discard: Sequence[str] = (),
    ) -> list[bytearray | blobs.BlobError | None]:
        """``take_upload`` for each (key, trusted key, limit) in ``moves``, in a few round trips.

        First the ``counts`` are added to their rounds (run, round, field, count);
        last the ``discard`` keys are deleted. Each answer is the payload, None
        (the upload went meanwhile: nothing was moved) or the BlobError that
        refuses it (over its limit once moved, or malformed).
        """
        pipe = self.redis.pipeline(transaction=False)
        for run, number, field, count in counts:
            pipe.hincrby(keys.round_(run, number), field, count)
        for key, trusted_key, _ in moves:
            pipe.renamenx(key, trusted_key)  # never over a copy there: an accepted one is final
            pipe.expire(trusted_key, keys.UPLOAD_TTL)
            blobs.stored_bytes(pipe, trusted_key)
        if discard:
            pipe.delete(*discard)
        replies = pipe.execute(raise_on_error=False)
        out: list[bytearray | blobs.BlobError | None] = [None] * len(moves)
        reading: list[int] = []
        for index, (_, _, limit) in enumerate(moves):
            renamed, _, stored = replies[len(counts) + 3 * index : len(counts) + 3 * index + 3]
            if isinstance(renamed, redis.ResponseError) and "no such key" in str(renamed).lower():
                continue  # it expired or was deleted meanwhile, and nothing was moved
            if isinstance(renamed, Exception):
                raise renamed
            if not renamed:
                continue  # a copy is there already (validated, maybe accepted): the upload goes unread
            # Bounded again after the move: the volunteer could have grown it after the first look.
            if not isinstance(stored, int) or stored > blobs.storage_bound(limit):
                out[index] = blobs.BlobError(f"upload of more than {limit} bytes")
            else:
                reading.append(index)
        for reply in [*replies[: len(counts)], *(replies[-1:] if discard else [])]:
            if isinstance(reply, Exception):
                raise reply
        read = blobs.read_many(
            self.redis, [moves[i][1] for i in reading], [moves[i][2] for i in reading], remote=self
        )
        for index, blob in zip(reading, read, strict=True):
            out[index] = blob
        return out

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
        run: str | None = None,
        **counts: int,
    ) -> None:
        """Add to a volunteer's record (shards_done, samples, accepted, rejected); trusted side only.

        With a ``ledger``, credit earned in ``run`` is also written to that run's ledger on disk.
        """
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
        if self.ledger is not None and run is not None:
            self.ledger.credit(run, volunteer, counts, seconds, device, memory_gb)

    def accepted_shards(self, names: list[str]) -> dict[str, int]:
        """Each volunteer's merged shards (its credit, every run): its record for probation."""
        pipe = self.redis.pipeline()
        for name in names:
            pipe.hget(keys.volunteer(name), "accepted")
        return {name: int(float(raw)) if raw is not None else 0 for name, raw in zip(names, pipe.execute())}

    def similarities(self, run: str, names: list[str]) -> dict[str, bytes | None]:
        """Each volunteer's accumulated direction in ``run``, as stored (``merging.sybils.encode``)."""
        if not names:
            return {}
        return dict(zip(names, self.redis.hmget(keys.similarity(run), names)))

    def set_similarities(self, run: str, values: dict[str, bytes], clusters: dict[str, str | None]) -> None:
        """Store accumulated directions, and each named volunteer's group (None: in none)."""
        pipe = self.redis.pipeline()
        if values:
            pipe.hset(keys.similarity(run), mapping=values)
        for name, group in clusters.items():
            if group is None:
                pipe.hdel(keys.clusters(), name)
            else:
                pipe.hset(keys.clusters(), name, group)
        pipe.execute()

    def clusters(self) -> dict[str, str]:
        """Volunteer -> the similarity group it last shared weight with."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.clusters()).items()}

    def reputations(self, names: list[str]) -> dict[str, float | None]:
        """Each volunteer's reputation (``--verify probe``); None for one never judged."""
        pipe = self.redis.pipeline()
        for name in names:
            pipe.hget(keys.volunteer(name), "reputation")
        return {name: float(raw) if raw is not None else None for name, raw in zip(names, pipe.execute())}

    def set_reputations(self, values: dict[str, float], run: str | None = None) -> None:
        """Set reputations (judged in ``run``: also written to its ledger, with a ``ledger``)."""
        pipe = self.redis.pipeline()
        for name, value in values.items():
            pipe.sadd(keys.volunteers(), name)
            pipe.hset(keys.volunteer(name), "reputation", repr(round(float(value), 6)))
        pipe.execute()
        if self.ledger is not None and run is not None:
            self.ledger.reputations(run, {name: round(float(v), 6) for name, v in values.items()})

    def volunteers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in sorted(n.decode() for n in self.redis.smembers(keys.volunteers())):
            raw = self.redis.hgetall(keys.volunteer(name))
            out[name] = {k.decode(): number_or_text(v.decode()) for k, v in raw.items()}
        return out

    def queue_depths(self, routed: list[str] | tuple[str, ...] = ()) -> dict[str, int]:
        """Messages waiting on ``train`` and ``aggregate``, and on the ``routed`` queues named."""
        return {queue: int(self.redis.llen(queue)) for queue in (*keys.QUEUES, *routed)}
