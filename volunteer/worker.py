"""What a volunteer does with one shard task: fetch, train, compress, upload.

``ShardRunner`` lives once per worker process and caches only what is safe to
reuse across rounds: model versions (immutable, keyed by version), built jobs
and the error-feedback residuals of lossy codecs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from broker.pointers import ObjectStoreError
from broker.routing import CAPABILITY_REFUSAL
from broker.run_config import RunConfig
from jobs import BUILTIN_JOBS, Job, load_job, reads_local_data, reuses_model
from serialization import Encoded, TensorDict, apply_update, dumps, dumps_stream, loads, parse_codec
from volunteer import slicing
from volunteer.challenge import Prover
from volunteer.checkpoint import ShardKey, ShardState
from volunteer.feedback import ErrorFeedback
from volunteer.guest import Guest, LeaseHold, Progress, ShardGate
from volunteer.store import VolunteerStore
from volunteer.trainer import ShardDropped, ShardResult, seed_for, train_shard

log = logging.getLogger("crowdtrain.volunteer")

MODEL_CACHE_SIZE = 2
# A volunteer this many versions behind, or more, fetches the whole model rather than the updates.
MAX_UPDATES = 8
INNER_STATES = 2
MAX_REASON = 200


@dataclass(frozen=True)
class VolunteerOptions:
    """Who this volunteer is and what it agrees to run."""

    name: str
    device: str = "cpu"
    allowed_jobs: frozenset[str] = field(default_factory=lambda: frozenset(BUILTIN_JOBS))
    data: str | None = None  # its own training data (volunteer start --data): never leaves this machine
    memory_gb: int = 0  # device memory it offers (broker.routing), told to the coordinator in its uploads
    guest: Guest | None = None  # the owner's rules and the board they are posted on (volunteer.guest)


class ShardRunner:
    """Trains shards for any run, one at a time, in one worker process."""

    def __init__(self, store: VolunteerStore, options: VolunteerOptions) -> None:
        self.store = store
        self.options = options
        self.device = torch.device(options.device)
        self._models: OrderedDict[tuple[str, int], TensorDict] = OrderedDict()
        self._jobs: dict[str, Job] = {}
        self._configs: dict[str, RunConfig] = {}
        self._feedback: dict[str, ErrorFeedback] = {}
        # --inner-state keep: each run's inner optimizer state, for the few latest runs only
        self._inner: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._inner_weights: dict[str, float] = {}  # a run slice's state: its share of a model's
        self._slot: dict[str, Any] | None = None
        self._lease = LeaseHold(None, 0.0)  # the shard's lease: its upload token, or None once given back
        self._progress = Progress(options.guest) if options.guest is not None else None
        if options.guest is not None:
            options.guest.checkpoints.prune()
        # the model the last shard trained, kept for the run's next one when its job allows (reuse_model)
        self._trained: tuple[Job, torch.nn.Module] | None = None
        # answers the trusted side's capability challenges: before the first shard, then hourly
        self._prover = Prover(store.redis, options.name, self.device, options.memory_gb)

    def run(
        self,
        run: str,
        number: int,
        shard: int,
        shards: int,
        version: int,
        upload: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train one shard and report it; skip it without training if it is not the round's to do.

        The round in Redis, not the task message, says which shards and base
        version are wanted: anyone may push a task. The shard is trained only
        under its lease from the trusted side, renewed while it trains; the
        lease, not the message, holds the upload slot of a run with a blob
        store (``upload`` is ignored). Whatever goes wrong while training is
        reported as the shard's failure, so the round need not wait for its
        deadline.
        """
        summary: dict[str, Any] = {"run": run, "round": number, "shard": shard}
        if self.options.guest is not None and self.options.guest.board.paused:
            log.info("skipping %s round %d shard %d: paused", run, number, shard)
            return {**summary, "skipped": "paused: this volunteer takes no shard now"}
        self._prover.maybe()
        wanted = self.store.round_info(run, number)
        buffered = wanted is not None and self._config(run).is_async
        if wanted is not None and buffered:
            problem = _not_wanted_async(wanted, shard, shards, version, self._config(run))
        else:
            problem = _not_wanted(wanted, shard, shards, version)
        if problem is not None:
            log.info("skipping %s round %d shard %d: %s", run, number, shard, problem)
            return {**summary, "skipped": problem}
        lease = self.store.lease(run, number, shard)
        if not lease.get("granted"):
            reason = f"no lease: {lease.get('reason')}"
            log.info("skipping %s round %d shard %d: %s", run, number, shard, reason)
            self._withdraw(run, str(lease.get("reason")))
            return {**summary, "skipped": reason}
        seconds = float(lease.get("seconds") or 20.0)
        self._lease, self._slot = LeaseHold(str(lease["token"]), seconds), lease.get("upload")
        with self.store.renewing(run, number, shard, self._lease.current, seconds):
            return self._leased(run, number, shard, shards, version, summary, buffered)

    def _withdraw(self, run: str, reason: str) -> None:
        """Refused for a failed capability claim: take no more of the run's queue until the next challenge.

        The main process reads the board before it acknowledges this task
        (``tasks.training.QueueGate``) and stops consuming every queue the
        failed claim rules out (``broker.routing.unservable``), so it takes no
        message it would only be refused for; the trusted side has posted this
        one again for another volunteer. They come back when this runner's
        next challenge is due, which its next shard answers before it asks
        for a lease.
        """
        guest = self.options.guest
        if guest is None or not reason.startswith(CAPABILITY_REFUSAL):
            return
        queue = self._config(run).need.queue
        guest.board.withdraw(queue, reason, self._prover.due)
        log.info("refused %s: not taking %s until the next capability challenge", reason, queue)

    def _leased(
        self,
        run: str,
        number: int,
        shard: int,
        shards: int,
        version: int,
        summary: dict[str, Any],
        buffered: bool,
    ) -> dict[str, Any]:
        """``run`` once the shard's lease is ours."""
        if buffered:  # a job of an asynchronous run: too old to be of use is said so, not trained
            stale = self._too_stale(run, version)
            if stale is not None:
                self._upload(run, number, shard, dumps({}, {"failure": stale}))
                return {**summary, "skipped": stale}
        try:
            return self._train(run, number, shard, shards, version, summary)
        except ShardDropped as e:  # paused past its lease, and given to another: nothing is uploaded
            log.info("%s round %d shard %d dropped: %s", run, number, shard, e)
            return {**summary, "skipped": str(e)}
        except Exception as e:  # out of memory, a job's own error, a job it may not import
            reason = f"volunteer error: {type(e).__name__}: {e}"[:MAX_REASON]
            log.exception("%s round %d shard %d failed", run, number, shard)
            self._upload(run, number, shard, dumps({}, {"failure": reason}))
            return {**summary, "failed": reason}

    def _train(
        self,
        run: str,
        number: int,
        shard: int,
        shards: int,
        version: int,
        summary: dict[str, Any],
    ) -> dict[str, Any]:
        config = self._config(run)
        if config.job not in self.options.allowed_jobs:
            reason = (
                f"volunteer {self.options.name} does not run job {config.job!r} (not on its --allow-job list)"
            )
            self._upload(run, number, shard, dumps({}, {"failure": reason}))
            return {**summary, "skipped": reason}
        job = self._job(run, config)
        data, refusal = _local_data(self.options.data, job, config)
        if refusal is not None:
            self._upload(run, number, shard, dumps({}, {"failure": refusal}))
            return {**summary, "skipped": refusal}
        weights, downlink = self._model(run, version)
        model = self._module(job)
        key = ShardKey(run, number, shard, version)
        steps = config.local_steps
        gate, resume = self._manners(key, model, steps)
        trained = False
        try:
            result = self._trained_shard(job, weights, model, config, key, shards, data, gate, resume)
            trained = True
        finally:
            if self.options.guest is not None:
                self.options.guest.checkpoints.delete(key)
            if self._progress is not None:
                self._progress.done(trained)
        return self._send(run, number, shard, version, config, job, model, downlink, result, summary)

    def _trained_shard(
        self,
        job: Job,
        weights: TensorDict,
        model: torch.nn.Module,
        config: RunConfig,
        key: ShardKey,
        shards: int,
        data: str | None,
        gate: ShardGate | None,
        resume: ShardState | None,
    ) -> ShardResult:
        run, number, shard = key.run, key.round, key.shard
        part = slicing.assignment(config, shard)
        return train_shard(
            job,
            weights,
            # an asynchronous run numbers its jobs on: they cycle over the shards
            shard=slicing.data_shard(config, number, shard, shards),
            shards=shards,
            steps=config.local_steps,
            lr=config.lr,
            optimizer=config.optimizer,
            device=self.device,
            seed=seed_for(run, number, shard),
            seconds=_budget(config.shard_seconds),
            data=data,
            optimizer_state=self._inner.get(_own(run, part)) if config.keeps_inner_state else None,
            model=model,
            gate=gate,
            resume=resume,
            trainable=None if part is None else part[1],
            autocast=config.autocast,
        )

    def _manners(
        self, key: ShardKey, model: torch.nn.Module, steps: int
    ) -> tuple[ShardGate | None, ShardState | None]:
        """The shard's gate (throttle, pause) and its saved state if a pause left one that fits."""
        guest = self.options.guest
        if guest is None or self._progress is None:
            return None, None
        self._progress.shard(key.run, key.round, key.shard, steps)

        def release(token: str) -> object:
            return self.store.release(key.run, key.round, key.shard, token)

        def relet() -> dict[str, Any]:
            answer = self.store.lease(key.run, key.round, key.shard)
            if answer.get("granted"):  # a run with a blob store: the new lease's slot
                self._slot = answer.get("upload")
            return answer

        gate = ShardGate(guest, self._progress, key, self._lease, release, relet)
        resume = guest.checkpoints.load(key)
        if resume is not None:
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            if {k: tuple(v.shape) for k, v in resume.weights.items()} != expected or resume.done >= steps:
                resume = None
            else:
                where = (key.run, key.round, key.shard, resume.done)
                log.info("%s round %d shard %d: going on from step %d", *where)
        return gate, resume

    def _send(
        self,
        run: str,
        number: int,
        shard: int,
        version: int,
        config: RunConfig,
        job: Job,
        model: torch.nn.Module,
        downlink: int,
        result: ShardResult,
        summary: dict[str, Any],
    ) -> dict[str, Any]:
        """Check the trained shard, encode its delta and upload it."""
        part = slicing.assignment(config, shard)
        own = _own(run, part)  # a sliced run keeps inner state and residuals per slice
        weight = 1.0 / config.slices
        self._keep_inner(
            own, config, result.optimizer_state if math.isfinite(result.train_loss) else None, weight
        )
        if not math.isfinite(result.train_loss) or not _finite(result.delta):
            failure = {"failure": "non-finite values", "downlink": downlink}
            self._upload(run, number, shard, dumps({}, failure))
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
        if part is not None:
            meta["slice"] = part[0]
        codec = parse_codec(config.compression)
        blob = self._feedback.setdefault(own, ErrorFeedback()).encode_stream(result.delta, meta, codec)
        self._upload(run, number, shard, blob)
        # its parameters held the delta, now sent: the next shard loads over them (a sliced
        # run's frozen parameters hold the cached version's own storage: never loaded over)
        if reuses_model(job) and part is None:
            self._trained = (job, model)
        log.info(
            "%s round %d shard %d: %d steps, loss %.4f, %.0f samples/s, %d bytes sent",
            run,
            number,
            shard,
            result.steps,
            result.train_loss,
            result.samples / max(result.seconds, 1e-9),
            blob.size,
        )
        if part is not None:
            summary = {**summary, "slice": part[0]}
        return {
            **summary,
            "loss": round(result.train_loss, 4),
            "samples": result.samples,
            "bytes": blob.size,
            "seconds": round(result.seconds, 3),
        }

    def _module(self, job: Job) -> torch.nn.Module:
        """The model to train: the one this job's last shard here trained, if kept, else a new build.

        A kept model is taken out of its slot first, so one whose shard then
        fails is never reused, and another run's goes before this one is built.
        """
        kept, self._trained = self._trained, None
        if kept is not None and kept[0] is job:
            return kept[1]
        del kept
        return job.build_model()

    def _keep_inner(
        self, run: str, config: RunConfig, state: dict[str, Any] | None, weight: float = 1.0
    ) -> None:
        """Keep a run's (or a run slice's) inner optimizer state for its next shard (``--inner-state keep``).

        At most INNER_STATES runs' states (each about twice the model; a slice's
        counts ``weight``, its share of the model) stay in memory: the least
        recently trained goes first.
        """
        if not config.keeps_inner_state or state is None:
            self._inner.pop(run, None)  # none kept, or a diverged shard's: the next starts afresh
            self._inner_weights.pop(run, None)
            return
        self._inner[run] = state
        self._inner_weights[run] = weight
        self._inner.move_to_end(run)
        while sum(self._inner_weights.get(k, 1.0) for k in self._inner) > INNER_STATES + 1e-9:
            oldest, _ = self._inner.popitem(last=False)
            self._inner_weights.pop(oldest, None)

    def _too_stale(self, run: str, version: int) -> str | None:
        """Why a job on ``version`` is not worth training any more (None if it is)."""
        limit = self._config(run).max_staleness
        current = self.store.version(run)
        if isinstance(limit, int) and current is not None and current - version > limit:
            return f"stale: version {version} is {current - version} versions behind the current {current}"
        return None

    def _upload(self, run: str, number: int, shard: int, blob: bytes | Encoded) -> None:
        """Store a result (a delta, or a failure report) under our own key and announce it.

        Its token is the lease's: the intake counts no upload without its lease.

        Failures travel as uploads too, so everything the aggregator counts
        comes from a key that only this volunteer's credentials can write. If
        the job's blob store refuses the upload, the failure is said in Redis
        instead, so the shard can be offered again at once.
        """
        token = self._lease.token or ""  # given back: the intake counts nothing under an empty token
        began = time.monotonic()
        try:
            self.store.put_upload(run, number, shard, token, blob, self._slot)
        except ObjectStoreError as e:
            log.warning("%s round %d shard %d: %s", run, number, shard, e)
            report = dumps({}, {"failure": f"volunteer error: {e}"[:MAX_REASON]})
            self.store.put_upload(run, number, shard, token, report)
        self._pace_upload(blob, time.monotonic() - began)

    def _pace_upload(self, blob: bytes | Encoded, seconds: float) -> None:
        """Wait after an upload so uploads average at most ``--max-upload-mbps`` (a guest's bandwidth)."""
        guest = self.options.guest
        limit = guest.prefs.max_upload_mbps if guest is not None else None
        if limit is None:
            return
        size = blob.size if isinstance(blob, Encoded) else len(blob)
        wait = size * 8 / (limit * 1e6) - seconds
        if wait > 0:
            time.sleep(wait)

    def _model(self, run: str, version: int) -> tuple[TensorDict, int]:
        """The weights of a version and the bytes fetched for them (0 when cached).

        With a lossy downlink (``--downlink-compression``) a volunteer holding an
        older version of the run fetches only the updates since, and rebuilds
        the version bit for bit as the aggregator published it; without a base
        (or once an update left Redis) it fetches the whole model.
        """
        key = (run, version)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key], 0
        rebuilt = self._from_updates(run, version) if version else self._built_here(run)
        if rebuilt is not None:
            weights, fetched = rebuilt
        else:
            blob = self.store.model_blob(run, version)
            if blob is None:
                raise LookupError(f"model version {version} of run {run!r} is not in Redis")
            weights, _ = loads(blob)
            fetched = len(blob)
        self._models[key] = weights
        if not self._config(run).is_async:  # a synchronous run never asks for an older one
            for older in [k for k in self._models if k[0] == run and k[1] < version]:
                del self._models[older]
        while len(self._models) > MODEL_CACHE_SIZE:
            self._models.popitem(last=False)
        return weights, fetched

    def _built_here(self, run: str) -> tuple[TensorDict, int] | None:
        """Version 0 built from the job's seed, if its bytes are the run's (``initial_digest``): no fetch.

        The same seed gives the same weights on any machine with the same torch;
        where it does not (another version, another platform), the model is fetched.
        """
        config = self._config(run)
        digest = config.initial_digest
        if not isinstance(digest, str) or config.job not in self.options.allowed_jobs:
            return None
        model = self._job(run, config).build_model()
        # the model's own tensors (it is dropped, they stay), hashed a piece at a time: no copy
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        del model
        hashed = hashlib.sha256()
        for piece in dumps_stream(weights, {"run": run, "version": 0}).pieces:
            hashed.update(piece)
        if hashed.hexdigest() != digest:
            log.info("version 0 of %s built here differs from the run's: fetching it", run)
            return None
        return weights, 0

    def _from_updates(self, run: str, version: int) -> tuple[TensorDict, int] | None:
        """``version`` rebuilt from the newest cached older one and the updates since, if they exist."""
        spec = self._config(run).downlink_compression
        held = [v for (r, v) in self._models if r == run and v < version]
        if not held or spec in (None, "none") or version - max(held) > MAX_UPDATES:
            return None
        base = max(held)
        blobs = self.store.update_blobs(run, range(base + 1, version + 1))
        if any(blob is None for blob in blobs):
            return None
        weights = self._models[(run, base)]
        for blob in blobs:
            assert blob is not None
            weights = apply_update(weights, loads(blob)[0])
        return weights, sum(len(blob or b"") for blob in blobs)

    def _config(self, run: str) -> RunConfig:
        """A run's settings never change after ``init``: read them once."""
        if run not in self._configs:
            self._configs[run] = self.store.run_config(run)
        return self._configs[run]

    def _job(self, run: str, config: RunConfig) -> Job:
        if run not in self._jobs:
            self._jobs[run] = load_job(config.job, config.job_args, allowed=self.options.allowed_jobs)
        return self._jobs[run]


def _own(run: str, part: tuple[int, frozenset[str]] | None) -> str:
    """The key of what a volunteer keeps per run, or per slice of a sliced run (inner state, residual)."""
    return run if part is None else f"{run}\x00slice{part[0]}"


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


def _not_wanted_async(
    round_info: dict[str, Any], shard: int, shards: int, version: int, config: RunConfig
) -> str | None:
    """Why a job of an asynchronous run does not match its posting round (forged), or None.

    Its round may have been merged since: the delta then counts in the buffer open when it
    arrives. Each round numbers the jobs posted with it, 0 up to its ``shards`` count.
    """
    if shards != config.shards or not 0 <= shard < int(round_info.get("shards") or 0):
        return f"job {shard} of {shards} shards is not one posted with this round"
    if round_info.get("base_version") != version:
        return f"version {version} is not the round's base {round_info.get('base_version')}"
    return None


def _budget(value: Any) -> float | None:
    """A run's shard time budget in seconds, or None for a step count only."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _local_data(path: str | None, job: Job, config: RunConfig) -> tuple[str | None, str | None]:
    """Where this shard's batches come from: (local path or None, or a reason to refuse the shard).

    A volunteer with ``--data`` trains on its own data whenever the job can read
    it; a run made with ``init --data volunteer`` trains on nothing else.
    """
    only_local = config.data == "volunteer"
    if path is None:
        return None, "no local data" if only_local else None
    if reads_local_data(job):
        return path, None
    if only_local:
        return None, f"job {config.job!r} cannot read local data (it has no local_shard)"
    return None, None
