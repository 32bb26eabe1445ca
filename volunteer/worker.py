"""What a volunteer does with one shard task: fetch, train, compress, upload.

``ShardRunner`` lives once per worker process and caches only what is safe to
reuse across rounds: model versions (immutable, keyed by version), built jobs
and the error-feedback residuals of lossy codecs.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs import BUILTIN_JOBS, Job, load_job, reads_local_data
from serialization import TensorDict, dumps, loads, parse_codec
from volunteer.feedback import ErrorFeedback
from volunteer.store import VolunteerStore
from volunteer.trainer import seed_for, train_shard

log = logging.getLogger("crowdtrain.volunteer")

MODEL_CACHE_SIZE = 2
MAX_REASON = 200
ReportFn = Callable[..., None]


@dataclass(frozen=True)
class VolunteerOptions:
    """Who this volunteer is and what it agrees to run."""

    name: str
    device: str = "cpu"
    allowed_jobs: frozenset[str] = field(default_factory=lambda: frozenset(BUILTIN_JOBS))
    data: str | None = None  # its own training data (volunteer start --data): never leaves this machine
    memory_gb: int = 0  # device memory it offers (broker.routing), told to the coordinator in its uploads


class ShardRunner:
    """Trains shards for any run, one at a time, in one worker process."""

    def __init__(self, store: VolunteerStore, options: VolunteerOptions) -> None:
        self.store = store
        self.options = options
        self.device = torch.device(options.device)
        self._models: OrderedDict[tuple[str, int], TensorDict] = OrderedDict()
        self._jobs: dict[str, Job] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._feedback: dict[str, ErrorFeedback] = {}

    def run(
        self, run: str, number: int, shard: int, shards: int, version: int, report: ReportFn
    ) -> dict[str, Any]:
        """Train one shard and report it; skip it without training if it is not the round's to do.

        The round in Redis, not the task message, says which shards and base
        version are wanted: anyone may push a task. Whatever goes wrong while
        training is reported as the shard's failure, so the round need not
        wait for its deadline.
        """
        summary: dict[str, Any] = {"run": run, "round": number, "shard": shard}
        wanted = self.store.round_info(run, number)
        problem = _not_wanted(wanted, shard, shards, version)
        if problem is not None:
            log.info("skipping %s round %d shard %d: %s", run, number, shard, problem)
            return {**summary, "skipped": problem}
        try:
            return self._train(run, number, shard, shards, version, report, summary)
        except Exception as e:  # out of memory, a job's own error, a job it may not import
            reason = f"volunteer error: {type(e).__name__}: {e}"[:MAX_REASON]
            log.exception("%s round %d shard %d failed", run, number, shard)
            self._upload(run, number, shard, dumps({}, {"failure": reason}), report)
            return {**summary, "failed": reason}

    def _train(
        self,
        run: str,
        number: int,
        shard: int,
        shards: int,
        version: int,
        report: ReportFn,
        summary: dict[str, Any],
    ) -> dict[str, Any]:
        config = self._config(run)
        if config["job"] not in self.options.allowed_jobs:
            reason = (
                f"volunteer {self.options.name} does not run job {config['job']!r} "
                "(not on its --allow-job list)"
            )
            self._upload(run, number, shard, dumps({}, {"failure": reason}), report)
            return {**summary, "skipped": reason}
        job = self._job(run, config)
        data, refusal = _local_data(self.options.data, job, config)
        if refusal is not None:
            self._upload(run, number, shard, dumps({}, {"failure": refusal}), report)
            return {**summary, "skipped": refusal}
        weights, downlink = self._model(run, version)
        result = train_shard(
            job,
            weights,
            shard=shard,
            shards=shards,
            steps=int(config["local_steps"]),
            lr=float(config["lr"]),
            optimizer=str(config.get("optimizer", "adamw")),
            device=self.device,
            seed=seed_for(run, number, shard),
            seconds=_budget(config.get("shard_seconds")),
            data=data,
        )
        if not math.isfinite(result.train_loss) or not _finite(result.delta):
            failure = {"failure": "non-finite values", "downlink": downlink}
            self._upload(run, number, shard, dumps({}, failure), report)
            log.warning("%s round %d shard %d: non-finite values, not uploaded", run, number, shard)
            return {**summary, "failed": "non-finite values"}
        meta = {
            "run": run,
            "round": number,
            "shard": shard,
            "base_version": version,
            "samples": result.samples,
            "train_loss": result.train_loss,
            "steps": result.steps,
            "seconds": round(result.seconds, 3),
            "volunteer": self.options.name,
            "device": self.device.type,
            "memory_gb": self.options.memory_gb,
            "downlink": downlink,
        }
        codec = parse_codec(str(config["compression"]))
        blob = self._feedback.setdefault(run, ErrorFeedback()).encode(result.delta, meta, codec)
        self._upload(run, number, shard, blob, report)
        log.info(
            "%s round %d shard %d: %d steps, loss %.4f, %.0f samples/s, %d bytes sent",
            run,
            number,
            shard,
            result.steps,
            result.train_loss,
            result.samples / max(result.seconds, 1e-9),
            len(blob),
        )
        return {
            **summary,
            "loss": round(result.train_loss, 4),
            "samples": result.samples,
            "bytes": len(blob),
            "seconds": round(result.seconds, 3),
        }

    def _upload(self, run: str, number: int, shard: int, blob: bytes, report: ReportFn) -> None:
        """Store a result (a delta, or a failure report) under our own key, then announce it.

        Failures travel as uploads too, so everything the aggregator counts
        comes from a key that only this volunteer's credentials can write.
        """
        token = uuid.uuid4().hex
        self.store.put_upload(run, number, shard, token, blob)
        report(token)

    def _model(self, run: str, version: int) -> tuple[TensorDict, int]:
        """The weights of a version and the bytes fetched for them (0 when cached)."""
        key = (run, version)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key], 0
        blob = self.store.model_blob(run, version)
        if blob is None:
            raise LookupError(f"model version {version} of run {run!r} is not in Redis")
        weights, _ = loads(blob)
        self._models[key] = weights
        while len(self._models) > MODEL_CACHE_SIZE:
            self._models.popitem(last=False)
        return weights, len(blob)

    def _config(self, run: str) -> dict[str, Any]:
        """A run's settings never change after ``init``: read them once."""
        if run not in self._configs:
            self._configs[run] = self.store.run_config(run)
        return self._configs[run]

    def _job(self, run: str, config: dict[str, Any]) -> Job:
        if run not in self._jobs:
            self._jobs[run] = load_job(
                config["job"], config.get("job_args") or {}, allowed=self.options.allowed_jobs
            )
        return self._jobs[run]


def _finite(delta: TensorDict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in delta.values())


def _not_wanted(round_info: dict[str, Any] | None, shard: int, shards: int, version: int) -> str | None:
    """Why a shard task does not match its round in Redis (forged or stale), or None."""
    if round_info is None:
        return "no such round"
    if round_info.get("status") != "open":
        return f"round {round_info.get('status')}"
    if round_info.get("shards") != shards or not 0 <= shard < shards:
        return f"shard {shard} of {shards} is not one of the round's {round_info.get('shards')}"
    if round_info.get("base_version") != version:
        return f"version {version} is not the round's base {round_info.get('base_version')}"
    return None


def _budget(value: Any) -> float | None:
    """A run's shard time budget in seconds, or None for a step count only."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _local_data(path: str | None, job: Job, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """Where this shard's batches come from: (local path or None, or a reason to refuse the shard).

    A volunteer with ``--data`` trains on its own data whenever the job can read
    it; a run made with ``init --data volunteer`` trains on nothing else.
    """
    only_local = config.get("data") == "volunteer"
    if path is None:
        return None, "no local data" if only_local else None
    if reads_local_data(job):
        return path, None
    if only_local:
        return None, f"job {config['job']!r} cannot read local data (it has no local_shard)"
    return None, None
