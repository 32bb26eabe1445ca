"""What the trusted side knows about a run, read once: settings, job, model layout, bounds.

A run's settings and model layout never change after ``init``, so they are
cached per process. The bounds derived from them are what every upload is
checked against before it is downloaded or decoded.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from broker.run_config import RunConfig
from coordinator.merging.privacy import Privacy, from_config
from coordinator.rounds.modes import Rounds, mode_of
from coordinator.store import Store
from jobs import Job, batch_size, load_job
from jobs.slicing import slice_of
from serialization import Codec, Expected, encoded_size_bound, loads, parse_codec

Reference = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class RunContext:
    """One run as the aggregator sees it."""

    name: str
    config: RunConfig
    job: Job
    reference: Reference  # the floating tensors a delta must hold, as float32
    expected: Expected  # the same, with the run's codec: checked in every upload's header
    upload_bound: int  # most bytes an honest upload can have
    download_bound: int  # bytes of the whole model on the wire: the most one shard fetches
    model_bytes: int  # float32 bytes of the model: the most an upload may decode to
    model_norm: float  # L2 norm of version 0 (or the current one): the scale of small rounds' norm screen
    max_samples: int  # local_steps * batch_size: the most samples a shard may claim
    privacy: Privacy | None  # DP-FedAvg settings, None for a run without them
    queue: str  # the train queue its shards go to (broker.routing)
    slices: tuple[frozenset[str], ...] = ()  # a sliced run's (init --slices): the tensors of each

    def expected_for(self, shard: int) -> Expected:
        """What shard ``shard``'s upload must hold: its slice's tensors in a sliced run, else all."""
        if not self.slices:
            return self.expected
        names = self.slices[slice_of(shard, len(self.slices))]
        return {k: v for k, v in self.expected.items() if k in names}

    def reference_for(self, shard: int) -> Reference:
        """``reference`` restricted as ``expected_for`` is."""
        if not self.slices:
            return self.reference
        names = self.slices[slice_of(shard, len(self.slices))]
        return {k: v for k, v in self.reference.items() if k in names}

    @property
    def mode(self) -> Rounds:
        """The run's mode as a policy (``coordinator.rounds.modes``)."""
        return mode_of(self.config)

    @property
    def codec(self) -> str:
        return self.config.compression


def upload_bound(weights: Mapping[str, torch.Tensor], codec: Codec) -> int:
    """The most bytes an honest upload can have: the model's floating tensors, as float32, in ``codec``.

    Every upload is checked against it, and ``init`` caps a blob store's upload slots at it.
    """
    return encoded_size_bound({k: tuple(v.shape) for k, v in weights.items() if v.is_floating_point()}, codec)


def _header_codec(codec: Codec, shape: tuple[int, ...]) -> str:
    """The codec an honest upload names in a float tensor's header: the run's, or its size policy's pick."""
    return codec.for_tensor(math.prod(shape), True).name


class RunContexts:
    """``RunContext`` per run, built on first use from Redis.

    One instance serves the aggregator's task, intake and watcher threads:
    a context is built once (it decodes a whole model version), not once per
    thread at the same moment.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._contexts: dict[str, RunContext] = {}
        self._building = threading.Lock()

    def __getitem__(self, run: str) -> RunContext:
        context = self._contexts.get(run)
        if context is None:
            with self._building:
                context = self._contexts.get(run)
                if context is None:
                    context = self._contexts[run] = self._build(run)
        return context

    def model_blob(self, run: str, version: int) -> bytes | bytearray:
        """A model version's bytes; LookupError if it left Redis."""
        blob = self.store.model_blob(run, version)
        if blob is None:
            raise LookupError(f"model version {version} of run {run!r} is not in Redis")
        return blob

    def _build(self, run: str) -> RunContext:
        config = self.store.run_config(run)
        job = load_job(config.job, config.job_args)
        # Version 0 gives the shapes and the norm's yardstick; once it left Redis
        # (CROWDTRAIN_KEEP_VERSIONS) the current version has the same shapes.
        blob = self.store.model_blob(run, 0) or self.model_blob(run, self.store.version(run))
        weights, _ = loads(blob)
        floats = {k: v for k, v in weights.items() if v.is_floating_point()}
        reference = {k: (tuple(v.shape), torch.float32) for k, v in floats.items()}
        codec = parse_codec(config.compression)
        shapes = {k: shape for k, (shape, _) in reference.items()}
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in floats.values()))
        return RunContext(
            name=run,
            config=config,
            job=job,
            reference=reference,
            expected={
                k: (shape, dtype, _header_codec(codec, shape)) for k, (shape, dtype) in reference.items()
            },
            upload_bound=upload_bound(floats, codec),
            download_bound=encoded_size_bound(shapes, "none"),
            model_bytes=sum(4 * v.numel() for v in floats.values()),
            model_norm=norm,
            max_samples=config.local_steps * batch_size(job),
            privacy=from_config(config),
            queue=config.need.queue,
            slices=tuple(frozenset(names) for names in config.slice_tensors or ()),
        )
