"""The trusted side of sliced runs (``init --slices S``): plan, memory need, merge slice by slice.

Shard i of a round trains slice ``i mod S`` (``jobs.slicing.slice_of``), so a
round of S or more shards covers every slice; its volunteer's data shard moves
on by one each round, so every slice meets every data shard. Each tensor is
merged from the deltas that trained it, by the run's strategy (one instance
per slice, its state the slice's share of the run's); a tensor no accepted
delta touched keeps its bytes. The norm screen compares a delta with those of
its own slice: slices of one model differ in norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from broker.routing import MEMORY_TIERS_GB
from broker.run_config import RunConfig
from coordinator.errors import UsageError
from coordinator.merging.aggregate import WeightedDelta
from coordinator.merging.strategies import Strategy
from coordinator.rounds.validation import screen_norms
from coordinator.runs.context import RunContext
from jobs import Job, JobError
from jobs.slicing import plan, slice_of, trainable
from serialization import TensorDict

# What a volunteer holds besides the model, per float32 byte of the slice it trains: the
# trained copy, its gradient, AdamW's two moments, and a bfloat16 error-feedback residual
# (docs/BENCHMARKS.md section 10: 5.2x the model for a whole-model shard with none of it shared).
SLICE_FACTOR = 4.5
GIB = 1 << 30


def plan_run(job: Job, weights: Mapping[str, torch.Tensor], count: int) -> list[list[str]]:
    """The run's ``count`` slices; UsageError (one line) for a count or a job's slices that do not fit."""
    if count == 1:  # the whole model: no job hook is asked
        return [list(trainable(weights))]
    try:
        if callable(getattr(job, "slices", None)):
            return plan(job, job.build_model(), count)
        return plan(job, _Shell(weights), count)
    except JobError as e:
        raise UsageError(str(e)) from None


def shard_memory_gb(weights: Mapping[str, torch.Tensor], slices: Sequence[Sequence[str]]) -> float:
    """GB (2^30 bytes) one shard needs: the model once, and the largest slice ``SLICE_FACTOR`` more.

    A volunteer builds the job's model beside the version it holds before the
    frozen tensors take the version's storage: twice the model, at the least.
    """
    sizes = trainable(weights)
    model = sum(4 * n if weights[k].dtype != torch.float64 else 8 * n for k, n in sizes.items())
    model += sum(t.numel() * t.element_size() for k, t in weights.items() if k not in sizes)
    largest = max(sum(4 * sizes[n] for n in names) for names in slices)
    return math.ceil(max(2 * model, model + SLICE_FACTOR * largest) / GIB * 100) / 100


def settings(job: Job, weights: Mapping[str, torch.Tensor], config: RunConfig) -> dict[str, Any]:
    """The config entries of a run of ``config.slices`` slices (``refuse`` checked its other settings).

    A sliced run with no ``--min-memory-gb`` routes its shards by what one needs
    (rounded up to a tier; a need under the smallest goes to ``train``, as any run's).
    """
    count = config.slices
    slices = plan_run(job, weights, count)
    need = shard_memory_gb(weights, slices)
    entries: dict[str, Any] = {"slices": count, "shard_memory_gb": need}
    if count > 1:
        entries["slice_tensors"] = slices
        if not config.min_memory_gb and need >= MEMORY_TIERS_GB[0]:
            entries["min_memory_gb"] = tier(need)
            if not entries["min_memory_gb"]:
                raise UsageError(f"one shard of --slices {count} needs {need:g} GB: choose more slices")
    return entries


def tier(need: float) -> int:
    """The memory tier (``broker.routing``) that covers ``need`` GB; 0 when none does."""
    return next((t for t in MEMORY_TIERS_GB if t >= need), 0)


def refuse(config: RunConfig) -> None:
    """UsageError for what a sliced run does not work with (README, "Models bigger than any volunteer")."""
    count = config.slices
    if config.shards < count:
        raise UsageError(f"--slices {count} needs --shards {count} or more: each round trains every slice")
    if config.mode == "async":
        raise UsageError("--slices works with --mode sync: an asynchronous buffer is not merged per slice")
    if config.dp_clip is not None:
        raise UsageError(
            "--slices does not work with differential privacy (--dp-clip): it clips whole deltas"
        )
    if config.downlink_compression not in (None, "none"):
        raise UsageError(
            "--slices needs --downlink-compression none: a lossy update moves tensors no delta touched"
        )


def check_slice(meta: Mapping[str, Any], context: RunContext, shard: int) -> str | None:
    """Why an upload's claimed slice is not its shard's (None if it is, or the run is not sliced)."""
    if not context.slices:
        return None
    claimed, expected = meta.get("slice"), slice_of(shard, len(context.slices))
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed != expected:
        return f"slice {str(claimed)[:20]} is not shard {shard}'s slice {expected}"
    return None


def by_slice(shards: Iterable[int], count: int) -> dict[int, list[int]]:
    """The shards of each slice that has any, in slice order."""
    groups: dict[int, list[int]] = {}
    for shard in sorted(shards):
        groups.setdefault(slice_of(shard, count), []).append(shard)
    return dict(sorted(groups.items()))


def parts(context: RunContext, used: dict[int, str]) -> list[tuple[list[str] | None, dict[int, str]]]:
    """The round's accepted shards slice by slice, each with its slice's tensors (unsliced: one part)."""
    if not context.slices:
        return [(None, used)]
    names = context.config.slice_tensors or ()
    return [
        (list(names[index]), {s: used[s] for s in shards})
        for index, shards in by_slice(used, len(context.slices)).items()
    ]


def screen(
    norms: Mapping[int, float],
    owners: Mapping[int, str],
    count: int,
    max_ratio: float,
    model_norm: float,
) -> dict[int, str]:
    """The norm screen within each slice: a delta is compared with its own slice's others."""
    flagged: dict[int, str] = {}
    for shards in by_slice(norms, count).values():
        part = {s: norms[s] for s in shards}
        flagged.update(screen_norms(part, {s: owners[s] for s in shards}, max_ratio, model_norm, ()))
    return flagged


def merge_one(
    make: Callable[[], Strategy],
    state: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    names: Sequence[str],
    deltas: Iterable[WeightedDelta],
) -> tuple[TensorDict, TensorDict]:
    """One slice merged: (its tensors of ``weights`` moved by ``deltas``, in place; its strategy state).

    ``state`` is the run's (every slice's); only this slice's part is read.
    """
    wanted = set(names)
    strategy = make()
    strategy.load_state_dict({k: v for k, v in state.items() if k.partition("/")[2] in wanted})
    merged = strategy.aggregate({k: weights[k] for k in names}, deltas)
    return merged, strategy.state_dict()


class SlicedStrategy(Strategy):
    """The run's strategy applied slice by slice; ``state_dict`` is every slice's state in one map."""

    def __init__(self, make: Callable[[], Strategy], state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.make = make
        self.state: TensorDict = dict(state)

    def merge_slice(self, weights: TensorDict, names: Sequence[str], deltas: Iterable[WeightedDelta]) -> None:
        """Merge one slice's deltas into its tensors of ``weights`` (in place); its state moves on."""
        merged, state = merge_one(self.make, self.state, weights, names, deltas)
        weights.update(merged)
        self.state.update(state)

    def state_dict(self) -> TensorDict:
        return dict(self.state)


class _Shell(torch.nn.Module):
    """A stand-in with ``weights`` as its ``state_dict``: the default plan needs no model built."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.weights = weights

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.weights)
