"""Reading a round's accepted copies on the trusted side: each from Redis once, decoded on demand.

The intake decoded each copy once already and recorded its norm and meta
(``RoundState.facts``), and kept its ``sketch`` in this process
(``SketchCache``), so judging and the copy check need not decode a voice
of one shard for them; the merge's passes (probes, the strategy) read the
compressed copies from the round's cache, ``UploadCache``, which holds them
up to ``CROWDTRAIN_MERGE_CACHE_MB`` and reads past that again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

from coordinator.rounds.asynchronous import staleness_weight
from coordinator.runs.context import RunContext
from coordinator.store import Store
from serialization import TensorDict, loads

# Raw upload bytes the merge reads ahead in one MGET (at least one upload): small deltas cost
# one round trip per batch, not per delta, and a large one is still read alone.
PREFETCH_BYTES = 1 << 20
SMALL_MODEL_CACHE = 64 << 20  # what any model's round may hold, however small the model


class RoundReader:
    """The round being merged: its accepted copies' bytes (cached) and their decoding."""

    def __init__(self, store: Store, cache_bytes: int) -> None:
        self.store = store
        self.cache_bytes = cache_bytes
        self._cache = UploadCache(cache_bytes)

    def clear(self) -> None:
        """The round is over: its cached copies go."""
        self._cache.clear()

    def voice(
        self, context: RunContext, used: dict[int, str], metas: dict[int, dict], shards: list[int]
    ) -> tuple[float, TensorDict]:
        """One volunteer's deltas of the round, combined by weight: (total weight, delta).

        A delta weighs its samples, discounted by its staleness in an
        asynchronous run (always 0 in a synchronous one).
        """
        total = sum(weight_of(metas[s]) for s in shards)
        combined: TensorDict = {}
        for shard, blob in zip(shards, self.blobs(context, [used[s] for s in shards])):
            delta = self.decode(context, blob, {}, shard)
            if delta is None:
                raise LookupError(f"the accepted upload of shard {shard} left Redis during the merge")
            share = weight_of(metas[shard]) / total
            for name, tensor in delta.items():
                if name in combined:
                    combined[name].add_(tensor, alpha=share)
                else:
                    combined[name] = tensor * share if len(shards) > 1 else tensor
        return total, combined

    def delta(self, context: RunContext, key: str, metas: dict[int, dict], shard: int) -> TensorDict | None:
        """Decode an accepted copy (exactly the bytes validated); its meta goes into ``metas``."""
        return self.decode(context, self.store.get_upload(key, context.upload_bound), metas, shard)

    def blobs(self, context: RunContext, copies: list[str]) -> Iterator[bytearray | None]:
        """The bytes of each accepted copy in turn: from the round's cache, else read ahead from
        Redis up to ``PREFETCH_BYTES`` at a time (and cached while the budget lasts).

        Each is a private copy: decoding the ``none`` codec gives views of the bytes, which the
        merge may scale in place.
        """
        # at most half the model's float32 bytes too (or SMALL_MODEL_CACHE): the merge's peak stays
        # under 4x the model (docs/BENCHMARKS.md section 10) whatever the codec; lossless uploads of
        # a large model are read per pass instead
        self._cache.budget = min(self.cache_bytes, max(context.model_bytes // 2, SMALL_MODEL_CACHE))
        step = max(1, PREFETCH_BYTES // max(1, context.upload_bound))
        for start in range(0, len(copies), step):
            batch = copies[start : start + step]
            missing = [key for key in batch if key not in self._cache]
            if missing:
                for key, blob in zip(missing, self.store.get_uploads(missing, context.upload_bound)):
                    self._cache.put(key, blob)
            for key in batch:
                yield self._cache.take(key)

    def decode(
        self, context: RunContext, blob: bytes | bytearray | None, metas: dict[int, dict], shard: int
    ) -> TensorDict | None:
        """Decode a copy's bytes against the run's model; its meta goes into ``metas``."""
        if blob is None:
            return None
        delta, meta = loads(
            blob,
            limit=context.upload_bound,
            max_decoded=context.model_bytes,
            expect=context.expected_for(shard),
        )
        metas[shard] = meta
        return delta


class UploadCache:
    """One round's accepted copies' bytes, so each is read from Redis once: up to ``budget`` bytes.

    Past the budget a copy is handed out without being kept (read again when
    needed); ``take`` gives a private copy of a kept one, ``clear`` ends the round.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._blobs: dict[str, bytearray | None] = {}  # as read: nothing else holds them
        self._held = 0
        self._passing: dict[str, bytearray | None] = {}  # read, not kept: handed out once

    def __contains__(self, key: str) -> bool:
        return key in self._blobs or key in self._passing

    def put(self, key: str, blob: bytearray | None) -> None:
        size = len(blob) if blob is not None else 0
        if self._held + size <= self.budget:
            self._blobs[key] = blob
            self._held += size
        else:
            self._passing[key] = blob

    def take(self, key: str) -> bytearray | None:
        if key in self._passing:
            return self._passing.pop(key)
        blob = self._blobs[key]
        return bytearray(blob) if blob is not None else None

    def clear(self) -> None:
        self._blobs.clear()
        self._passing.clear()
        self._held = 0


def weight_of(meta: dict) -> float:
    """A delta's weight in the merge: its samples, discounted by how many versions old it is."""
    return int(meta["samples"]) * staleness_weight(int(meta.get("staleness", 0)))


class SketchCache:
    """Each accepted copy's delta norm and ``sketch``, as the intake took them when it decoded it.

    Held for the merge in this process, by copy key, up to ``budget`` bytes
    (the oldest go first) and until its round is merged (``forget_through``);
    a copy not here (another process's intake, a restart, the budget) is
    decoded as before. The intake loop adds while a merge reads, hence the lock.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._held = 0
        self._kept: OrderedDict[str, tuple[str, int, float, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, run: str, number: int, key: str, norm: float, sketch: torch.Tensor) -> None:
        """Keep copy ``key`` of round ``number`` of ``run``: its norm and sketch."""
        size = _bytes(sketch)
        with self._lock:
            if key in self._kept or size > self.budget:
                return
            self._kept[key] = (run, number, norm, sketch)
            self._held += size
            while self._held > self.budget:
                _, oldest = self._kept.popitem(last=False)
                self._held -= _bytes(oldest[3])

    def get(self, key: str) -> tuple[float, torch.Tensor] | None:
        with self._lock:
            kept = self._kept.get(key)
        return None if kept is None else (kept[2], kept[3])

    def forget_through(self, run: str, number: int) -> None:
        """Round ``number`` of ``run`` is merged (or failed): its copies, and any older round's, go."""
        with self._lock:
            for key in [k for k, kept in self._kept.items() if kept[0] == run and kept[1] <= number]:
                self._held -= _bytes(self._kept.pop(key)[3])


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
