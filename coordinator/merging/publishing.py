"""What follows a merge on the trusted side: the version staged and committed exactly once, then
credit, reputations, the run's small state, pruning and the record on disk.

``Publisher`` keeps the version (and strategy state) it published last per run
(``kept``): the aggregator starts the next round from them instead of reading
them back from Redis.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from broker import keys
from broker.routing import MAX_MEMORY_GB
from coordinator.merging.downlink import lossy, publish, read_residual
from coordinator.merging.judging import voices
from coordinator.merging.plan import RoundPlan
from coordinator.merging.sampling import reputations_after
from coordinator.merging.sybils import remember
from coordinator.rounds.validation import accepted_norm
from coordinator.runs import checkpoints, ledger
from coordinator.runs.capabilities import Capabilities
from coordinator.runs.context import RunContext
from coordinator.store import Store
from coordinator.views.documents import round_record
from serialization import TensorDict, dumps_stream, loads

log = logging.getLogger("crowdtrain.aggregator")
_DEVICE = re.compile(r"[a-z]{2,8}(:[0-9]{1,3})?")  # what a volunteer may call its device


class Publisher:
    """Publishes merged rounds (and fails the others) for one aggregator."""

    def __init__(self, store: Store, home: Path, capabilities: Capabilities, keep_versions: int) -> None:
        self.store = store
        self.home = home
        self.capabilities = capabilities
        self.keep_versions = keep_versions
        # per run: the version this process last published, its weights and the strategy state after it
        self.kept: dict[str, tuple[int, TensorDict, TensorDict]] = {}

    def publish(
        self,
        context: RunContext,
        number: int,
        owner: str,
        info: dict,
        plan: RoundPlan,
        weights: TensorDict,
        strategy_state: TensorDict,
        clip: float | None,
        summary: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Stage the version, commit it exactly once, then what follows: credit, reputations, the
        run's small state, pruning and the disk. None if the commit was refused (taken over)."""
        run, version = context.name, int(info["base_version"]) + 1
        evaluation = evaluate(context, weights)
        staged = self.store.stage_model(
            run, version, owner, dumps_stream(weights, {"run": run, "version": version})
        )
        if strategy_state:
            self.store.stage_strategy(run, owner, dumps_stream(strategy_state))
        summary.update(evaluation, status="done", model_version=version, seconds=_since(info))
        result = self.store.rounds.commit(run, number, owner, version - 1, summary, staged)
        if result != "done":
            self.store.delete_upload(staged)
            log.warning("round %d of %s not published: %s", number, run, result)
            return None
        self.credit(run, plan.used, plan.metas, context.model_bytes)
        if plan.sybils is not None:
            remember(self.store, run, plan.sybils)
        merged_norm = accepted_norm(merged_voice_norms(plan.used, plan.norms))
        if merged_norm is not None:
            self.store.add_voice_norm(run, merged_norm)
        if plan.reputations:  # judged this round: merged voices gain reputation, rejected ones lose it
            after = reputations_after(plan.reputations, plan.selection, set(voices(plan.used)))
            if after:
                self.store.set_reputations(after, run=run)
        if clip is not None:  # adaptive clipping: the next round's C, once this one is published
            self.store.set_dp_clip(run, clip)
        self.store.prune_versions(run, version, context.mode.versions_kept(self.keep_versions))
        self.record(context, number, version, weights, strategy_state, summary)
        self.kept[run] = (version, weights, strategy_state)
        return summary

    def record(
        self,
        context: RunContext,
        number: int,
        version: int,
        weights: TensorDict,
        strategy_state: TensorDict,
        summary: dict[str, Any],
    ) -> None:
        """Write the published version and the state after it to disk: what ``restore`` needs.

        The downlink residual and the small state are read back from Redis,
        so the disk holds exactly what the commit published.
        """
        run = context.name
        residual = None
        if lossy(context.config.downlink_compression):
            residual = read_residual(self.store.downlink_residual(run))
        state = {"voice_norms": self.store.voice_norms(run), "dp_clip": self.store.dp_clip(run)}
        checkpoints.save_version(
            self.home, run, version, weights, strategy_state, context.config, residual=residual, state=state
        )
        checkpoints.append_metrics(self.home, run, summary)
        ledger.round_ended(self.home, run, round_record(self.store, run, number))

    def catch_up(self, context: RunContext, version: int, weights: TensorDict) -> None:
        """Write the current version and the state after it to disk from Redis, which still holds both."""
        run = context.name
        strategy = self.store.strategy_blob(run)
        residual = self.store.downlink_residual(run)
        state = {"voice_norms": self.store.voice_norms(run), "dp_clip": self.store.dp_clip(run)}
        checkpoints.save_version(
            self.home,
            run,
            version,
            weights,
            loads(strategy)[0] if strategy else None,
            context.config,
            residual=read_residual(residual),
            state=state,
        )
        log.warning("version %d of %s was not on disk: written from Redis", version, run)

    def publishable(
        self, context: RunContext, base: TensorDict, merged: TensorDict, version: int, owner: str
    ) -> TensorDict:
        """The version to publish: the merged weights, or with a lossy downlink
        (``coordinator.merging.downlink``) the base moved by the encoded update, which is staged
        with its residual for the commit."""
        spec = context.config.downlink_compression
        if not lossy(spec):
            return merged
        residual = read_residual(self.store.downlink_residual(context.name))
        meta = {"run": context.name, "version": version}
        # merged becomes the residual and base the version, each in its own storage (base is
        # views of its blob, read for this round alone)
        publication = publish(base, merged, residual, str(spec), meta, move_base=True)
        del residual  # folded into the change: its blob goes before the version is built
        self.store.stage_update(context.name, version, owner, publication.update, publication.residual)
        return publication.version

    def credit(self, run: str, used: dict[int, str], metas: dict[int, dict], model_bytes: int) -> None:
        """Credit counts merged deltas only: shards, samples and training time; the device they report."""
        credit: dict[str, dict[str, Any]] = defaultdict(lambda: {"shards": 0, "samples": 0, "seconds": 0.0})
        for shard, key in used.items():
            entry, meta = credit[keys.volunteer_of(key)], metas[shard]
            entry["shards"] += 1
            entry["samples"] += int(meta["samples"])
            entry["seconds"] += _seconds(meta.get("seconds"))
            device = meta.get("device")
            if isinstance(device, str) and _DEVICE.fullmatch(device):
                entry["device"] = device
            memory = meta.get("memory_gb")
            if isinstance(memory, int) and not isinstance(memory, bool) and 0 < memory <= MAX_MEMORY_GB:
                entry["memory_gb"] = memory
        for volunteer, entry in credit.items():
            shards = entry["shards"]
            self.store.credit(
                volunteer,
                run=run,
                device=entry.get("device"),
                memory_gb=entry.get("memory_gb"),
                seconds=entry["seconds"],
                shards_done=shards,
                accepted=shards,
                samples=entry["samples"],
            )
        # the speed its reports imply, against the speed its challenges measured
        params = model_bytes // 4
        for volunteer, entry in credit.items():
            self.capabilities.note_training(volunteer, entry["samples"], entry["seconds"], params)

    def fail(
        self, context: RunContext, number: int, owner: str, info: dict, summary: dict[str, Any], reason: str
    ) -> dict[str, Any]:
        base = int(info["base_version"])
        summary.update(status="failed", model_version=base, seconds=_since(info), reason=reason)
        result = self.store.rounds.commit(
            context.name, number, owner, base, summary, staged_key=None, reason=reason
        )
        if result == "failed":
            ledger.round_ended(self.home, context.name, round_record(self.store, context.name, number))
        log.warning("round %d of %s failed: %s", number, context.name, reason)
        return summary


def evaluate(context: RunContext, weights: TensorDict) -> dict[str, float]:
    """The job's evaluation of ``weights``; its model is gone when this returns."""
    model = context.job.build_model()
    model.load_state_dict(weights)
    return {k: float(v) for k, v in context.job.evaluate(model).items()}


def round_summary(
    context: RunContext, number: int, info: dict, metas: dict[int, dict], used: dict[int, str]
) -> dict[str, Any]:
    """The summary every round starts with: what was merged, of which job, strategy and codec."""
    samples = sum(int(metas[s]["samples"]) for s in used)
    reported = [(int(metas[s]["samples"]), metas[s].get("train_loss")) for s in used]
    losses = [(n, float(x)) for n, x in reported if isinstance(x, int | float)]
    train_loss = sum(n * x for n, x in losses) / max(1, sum(n for n, _ in losses)) if losses else None
    config = context.config
    return {
        "run": context.name,
        "round": number,
        "shards": int(info["shards"]),
        "accepted": len(used),
        "samples": samples,
        "train_loss": train_loss,
        "job": config.job,
        "strategy": config.strategy,
        "compression": config.compression,
    }


def merged_voice_norms(used: dict[int, str], norms: dict[int, float]) -> list[float]:
    """Each merged voice's norm as the screen counts it: the median of its shards' norms."""
    return [statistics.median(norms[s] for s in shards) for shards in voices(used).values()]


def _seconds(value: Any) -> float:
    """A shard's reported training time, kept in sane bounds (it only feeds samples_per_second)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return min(max(float(value), 1e-3), 7 * 24 * 3600.0)
    return 0.0


def _since(info: dict) -> float:
    return round(time.time() - float(info["posted_at"]), 3)
