"""The trusted side of a round: validate each upload, then merge the round once.

``Aggregator`` has no Celery in it; ``tasks.aggregation`` calls it. It keeps
only caches (jobs, tensor shapes) between calls: all round state is in Redis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from broker import keys
from coordinator import checkpoints
from coordinator.state import CLAIM_LEASE
from coordinator.store import Store
from coordinator.strategies import Strategy, make_strategy
from coordinator.validation import check_delta, check_meta, delta_norm, norm_outliers
from jobs import Job, load_job
from serialization import TensorDict, WireFormatError, dumps, encoded_size_bound, loads, parse_codec

log = logging.getLogger("crowdtrain.aggregator")

_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")
DEADLINE_POLL = 0.5
DEADLINE_RESEND = 10.0


class Aggregator:
    """Validates uploads and aggregates rounds for every run on one broker."""

    def __init__(self, store: Store, home: Path, name: str = "aggregator") -> None:
        self.store = store
        self.home = home
        self.name = name
        self._jobs: dict[str, Job] = {}
        self._configs: dict[str, dict[str, Any]] = {}
        self._references: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}

    # --- one upload --------------------------------------------------------
    def validate(self, run: str, number: int, shard: int, token: str, volunteer: str) -> tuple[str, bool]:
        """Check one shard's upload and count it at most once.

        Everything counted comes from the upload itself, which only the named
        volunteer can write (its key prefix): a forged message naming someone
        else finds no upload and is ignored. Returns the outcome (accepted,
        rejected, repeat, duplicate, late, unknown or ignored) and whether the
        round is now due for aggregation.
        """
        config = self._config(run)
        info = self.store.rounds.info(run, number)
        if info is None or not 0 <= shard < int(info["shards"]):
            log.warning("ignoring result for unknown round %s/%s shard %s", run, number, shard)
            return "unknown", False
        valid = isinstance(token, str) and _TOKEN.match(token)
        key = keys.upload(volunteer, run, number, shard, token) if valid else ""
        blob = self.store.get_upload(key) if key else None
        if blob is None:
            log.warning(
                "ignoring %s round %d shard %d: no upload from %s under token %.16r",
                run,
                number,
                shard,
                volunteer,
                token,
            )
            return "ignored", False
        reason, meta = self._check_upload(run, config, info, blob)
        if reason is not None:
            outcome = self._refuse(run, number, shard, volunteer, reason, token)
            if outcome != "repeat":
                self._count_shard(run, number, volunteer, meta, len(blob))
            self.store.delete_upload(key)
            return outcome, False
        outcome, due = self.store.rounds.accept(run, number, shard, key)
        if outcome != "repeat":  # a redelivered validation must not count anything twice
            self._count_shard(run, number, volunteer, meta, len(blob))
        if outcome == "accepted":
            self.store.credit(volunteer, accepted=1, samples=int(meta["samples"]))
            log.info("accepted %s round %d shard %d from %s", run, number, shard, volunteer)
        elif outcome != "repeat":
            self.store.delete_upload(key)
            log.info("%s result for %s round %d shard %d from %s", outcome, run, number, shard, volunteer)
        return outcome, due

    def _check_upload(self, run: str, config: dict, info: dict, blob: bytes) -> tuple[str | None, dict]:
        reference = self._reference(run, int(info["base_version"]))
        shapes = {k: shape for k, (shape, _) in reference.items()}
        bound = encoded_size_bound(shapes, parse_codec(config["compression"]))
        if len(blob) > bound:
            return f"upload of {len(blob)} bytes exceeds the {bound}-byte bound of its codec", {}
        try:
            delta, meta = loads(blob, limit=bound)
        except WireFormatError as e:
            return f"malformed upload: {e}", {}
        if "failure" in meta:  # the volunteer's own report that the shard failed
            return str(meta["failure"])[:200] or "failed", meta
        max_samples = int(config["local_steps"]) * int(getattr(self._job(run, config), "batch_size", 1 << 20))
        reason = check_meta(
            meta, base_version=int(info["base_version"]), max_samples=max_samples
        ) or check_delta(delta, reference)
        return reason, meta

    def _count_shard(self, run: str, number: int, volunteer: str, meta: dict, uplink: int) -> None:
        """Credit the volunteer for a shard it reported, and count the bytes both ways."""
        self.store.credit(volunteer, shards_done=1)
        self.store.rounds.add_bytes(run, number, "uplink_bytes", uplink)
        downlink = meta.get("downlink")
        if isinstance(downlink, int) and 0 < downlink < 1 << 40:
            self.store.rounds.add_bytes(run, number, "downlink_bytes", downlink)

    def _refuse(
        self, run: str, number: int, shard: int, volunteer: str, reason: str, upload: str = ""
    ) -> str:
        outcome = self.store.rounds.reject(run, number, shard, volunteer, reason, upload)
        if outcome == "rejected":
            self.store.credit(volunteer, rejected=1)
            log.warning("rejected %s round %d shard %d from %s: %s", run, number, shard, volunteer, reason)
        return outcome

    # --- one round ---------------------------------------------------------
    def aggregate(self, run: str, number: int) -> dict[str, Any] | None:
        """Merge the round if its quorum or deadline is reached; None if not ours to do."""
        owner = f"{self.name}:{uuid.uuid4().hex}"
        if self.store.rounds.claim(run, number, owner) != "claimed":
            return None
        started = time.time()
        with _renewing(self.store, run, number, owner):
            return self._aggregate_claimed(run, number, owner, started)

    def _aggregate_claimed(self, run: str, number: int, owner: str, started: float) -> dict[str, Any] | None:
        config = self.store.run_config(run)
        info = self.store.rounds.info(run, number) or {}
        base = int(info["base_version"])
        uploads = self.store.rounds.accepted_uploads(run, number)
        metas, norms, rejections = self._screen(run, config, uploads)
        for shard, reason in rejections.items():
            volunteer = keys.volunteer_of(uploads[shard])
            self.store.rounds.reject_claimed(run, number, shard, volunteer, reason)
            self.store.credit(volunteer, rejected=1, accepted=-1)
            log.warning("rejected %s round %d shard %d from %s: %s", run, number, shard, volunteer, reason)
        used = {s: k for s, k in uploads.items() if s in metas and s not in rejections}
        summary = self._summary(run, number, info, config, metas, used, rejections)
        if used:
            summary["mean_delta_norm"] = sum(norms[s] for s in used) / len(used)
        if not used:
            seconds = round(time.time() - float(info["posted_at"]), 3)
            summary.update(status="failed", model_version=base, seconds=seconds)
            self.store.rounds.commit(
                run, number, owner, base, summary, staged_key=None, reason="no accepted deltas"
            )
            log.warning("round %d of %s failed: no accepted deltas", number, run)
            return summary
        weights, strategy, evaluation = self._merge(run, config, base, used, metas)
        blob = dumps(weights, {"run": run, "version": base + 1})
        staged = self.store.stage_model(run, base + 1, owner, blob)
        strategy_state = strategy.state_dict()
        summary.update(
            evaluation,
            status="done",
            model_version=base + 1,
            seconds=round(time.time() - float(info["posted_at"]), 3),
        )
        result = self.store.rounds.commit(
            run, number, owner, base, summary, staged, dumps(strategy_state) if strategy_state else b""
        )
        if result != "done":
            self.store.redis.delete(staged)
            log.warning("round %d of %s not published: %s", number, run, result)
            return None
        checkpoints.save_version(self.home, run, base + 1, weights, strategy_state, config)
        checkpoints.append_metrics(self.home, run, summary)
        log.info(
            "round %d of %s -> version %d, eval_loss %.4f (%d accepted, %.2fs merging)",
            number,
            run,
            base + 1,
            summary.get("eval_loss", math.nan),
            len(used),
            time.time() - started,
        )
        return summary

    def _screen(
        self, run: str, config: dict, uploads: dict[int, str]
    ) -> tuple[dict[int, dict], dict[int, float], dict[int, str]]:
        """First pass: read each accepted delta's meta and norm, drop norm outliers."""
        metas: dict[int, dict] = {}
        norms: dict[int, float] = {}
        rejections: dict[int, str] = {}
        for shard, key in uploads.items():
            blob = self.store.get_upload(key)
            if blob is None:
                rejections[shard] = "upload expired before aggregation"
                continue
            delta, meta = loads(blob)
            metas[shard] = meta
            norms[shard] = delta_norm(delta)
            del delta, blob
        rejections.update(norm_outliers(norms, float(config.get("max_norm_ratio", 10.0))))
        return metas, norms, rejections

    def _merge(
        self, run: str, config: dict, base: int, used: dict[int, str], metas: dict[int, dict]
    ) -> tuple[TensorDict, Strategy, dict[str, float]]:
        """Second pass: stream the deltas through the run's strategy, then evaluate."""
        weights, _ = loads(self._model_blob(run, base))
        weights = {k: v.clone() for k, v in weights.items()}  # views of the blob are read-only
        strategy = make_strategy(
            config["strategy"],
            server_lr=config.get("server_lr"),
            momentum=config.get("momentum"),
            clip_norm=config.get("clip_norm"),
        )
        state_blob = self.store.strategy_blob(run)
        if state_blob:
            strategy.load_state_dict(loads(state_blob)[0])

        def deltas() -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
            for shard, key in used.items():
                blob = self.store.get_upload(key)
                if blob is not None:
                    yield float(metas[shard]["samples"]), loads(blob)[0]

        weights = strategy.aggregate(weights, deltas())
        job = self._job(run, config)
        model = job.build_model()
        model.load_state_dict(weights)
        evaluation = {k: float(v) for k, v in job.evaluate(model).items()}
        return weights, strategy, evaluation

    def _summary(
        self,
        run: str,
        number: int,
        info: dict,
        config: dict,
        metas: dict[int, dict],
        used: dict[int, str],
        rejections: dict[int, str],
    ) -> dict[str, Any]:
        samples = sum(int(metas[s]["samples"]) for s in used)
        reported = [(int(metas[s]["samples"]), metas[s].get("train_loss")) for s in used]
        losses = [(n, float(x)) for n, x in reported if isinstance(x, (int, float))]
        train_loss = sum(n * x for n, x in losses) / max(1, sum(n for n, _ in losses)) if losses else None
        return {
            "run": run,
            "round": number,
            "shards": int(info["shards"]),
            "accepted": len(used),
            "samples": samples,
            "train_loss": train_loss,
            "job": config["job"],
            "strategy": config["strategy"],
            "compression": config["compression"],
        }

    # --- caches ------------------------------------------------------------
    def _config(self, run: str) -> dict[str, Any]:
        """A run's settings never change after ``init``: read them once."""
        if run not in self._configs:
            self._configs[run] = self.store.run_config(run)
        return self._configs[run]

    def _job(self, run: str, config: dict) -> Job:
        if run not in self._jobs:
            self._jobs[run] = load_job(config["job"], config.get("job_args") or {})
        return self._jobs[run]

    def _model_blob(self, run: str, version: int) -> bytes:
        blob = self.store.model_blob(run, version)
        if blob is None:
            raise LookupError(f"model version {version} of run {run!r} is not in Redis")
        return blob

    def _reference(self, run: str, version: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if run not in self._references:
            weights, _ = loads(self._model_blob(run, version))
            self._references[run] = {
                k: (tuple(v.shape), torch.float32) for k, v in weights.items() if v.is_floating_point()
            }
        return self._references[run]


def watch_deadlines(store: Store, send: Callable[[str, int], None], stop: threading.Event) -> None:
    """Ask for aggregation of every due round (runs in a thread beside the worker).

    Covers what no task message triggers: deadlines, and rounds whose
    aggregator died holding them or before it sent ``aggregate_round``.
    """
    sent: dict[tuple[str, int], float] = {}
    while not stop.is_set():
        try:
            now = time.time()
            for key in store.rounds.due(now):
                if now - sent.get(key, 0.0) >= DEADLINE_RESEND:
                    sent[key] = now
                    send(*key)
        except Exception as e:  # a broker outage must not kill the watcher
            log.warning("deadline watcher: %s (retrying)", e)
        stop.wait(DEADLINE_POLL)


@contextlib.contextmanager
def _renewing(store: Store, run: str, number: int, owner: str) -> Iterator[None]:
    """Renew our claim on a round every third of its lease until the block ends."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(CLAIM_LEASE / 3):
            try:
                if store.rounds.renew(run, number, owner) != "renewed":
                    return  # taken over: our commit will be refused, which is safe
            except Exception as e:  # keep trying; the lease covers short blips
                log.warning("could not renew the claim on %s round %d: %s", run, number, e)

    thread = threading.Thread(target=renew, name="claim-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
