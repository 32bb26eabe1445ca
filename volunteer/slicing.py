"""A volunteer's side of a sliced run (``init --slices S``): train one slice, hold the rest once.

The run's config (written by the trusted ``init``, read from Redis) names each
slice's tensors; shard i of a round trains slice ``i mod S``. The tensors of
the other slices are frozen: no gradient, no optimizer state, no delta. On the
CPU they take the cached version's own storage rather than a copy (nothing
writes a frozen parameter, and a sliced run's model is never trained again),
so besides the version a volunteer holds only its slice's copy, gradient and
optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from broker.run_config import RunConfig
from jobs.slicing import slice_of


class SliceError(ValueError):
    """A run's slice settings a volunteer cannot use (reported as the shard's failure)."""


def assignment(config: RunConfig, shard: int) -> tuple[int, frozenset[str]] | None:
    """(slice index, its tensor names) of shard ``shard`` in a sliced run; None in an unsliced one."""
    count = config.slices or 1
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SliceError(f"the run's slice count {str(count)[:20]} is not a whole number >= 1")
    if count == 1:
        return None
    tensors = config.slice_tensors
    if not isinstance(tensors, list) or len(tensors) != count:
        raise SliceError("the run's slice_tensors do not list one entry per slice")
    index = slice_of(shard, count)
    names = tensors[index]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SliceError(f"the run's slice {index} is not a list of tensor names")
    return index, frozenset(names)


def data_shard(config: RunConfig, number: int, shard: int, shards: int) -> int:
    """The data shard a job trains: its own number, moved on by the round in a sliced run.

    Slice ``i mod S`` would otherwise only ever see data shards ``i mod S``.
    """
    if config.slices > 1:
        return (shard + number) % shards
    return shard % shards


def bind(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    names: frozenset[str],
    device: torch.device,
) -> None:
    """Load ``weights`` into ``model``; on the CPU its frozen parameters share the weights' storage.

    SliceError if a name of the slice is not one of the model's tensors.
    """
    state = model.state_dict()
    unknown = [n for n in names if n not in state]
    if unknown:
        raise SliceError(f"the run's slice names {unknown[0][:80]!r}, not a tensor of this job's model")
    shared: set[str] = set()
    if device.type == "cpu":
        for name, param in model.named_parameters():
            given = weights.get(name)
            if name in names or given is None or given.dtype != param.dtype or given.shape != param.shape:
                continue
            if given.device.type == "cpu":
                param.data = given
                shared.add(name)
    model.load_state_dict({k: v for k, v in weights.items() if k not in shared}, strict=False)


def freeze(
    model: torch.nn.Module, groups: list[dict[str, Any]], names: frozenset[str]
) -> list[dict[str, Any]]:
    """Freeze every parameter outside ``names``; the optimizer's groups without them."""
    for name, param in model.named_parameters():
        if name not in names:
            param.requires_grad_(False)
    kept = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    return [g for g in kept if g["params"]]
