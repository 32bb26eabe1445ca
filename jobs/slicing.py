"""Slices of a model (``init --slices S``): which tensors each shard of a sliced run trains.

A model bigger than any volunteer is trained a slice at a time: the trainable
tensors (the floating-point ``state_dict`` entries, the ones a delta holds)
are split into S disjoint slices that together hold every one of them. The
split keeps the model's own order (its structure) and balances the slices by
parameter count: contiguous groups whose largest is as small as it can be. A
job may choose its own with ``slices(model, count) -> list[list[str]]``; the
built-in ones cut between layers (``by_blocks``). Both sides import this: the
coordinator to plan a run's slices, a volunteer to know what it trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from jobs.interface import JobError


def trainable(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The trainable tensors of a ``state_dict``: name -> element count, in the model's order."""
    return {name: t.numel() for name, t in state.items() if t.is_floating_point()}


def plan(job: object, model: torch.nn.Module, count: int) -> list[list[str]]:
    """The ``count`` slices of ``model``: the job's own (checked), else ``balanced`` by tensor.

    JobError, saying why, for a count below 1, more slices than trainable
    tensors, or a job's slices that miss, repeat or invent a tensor or leave
    one empty.
    """
    state = model.state_dict()
    sizes = trainable(state)
    if count < 1:
        raise JobError(f"--slices {count}: a model is split into at least 1 slice")
    if count > len(sizes):
        raise JobError(f"--slices {count}: the model has only {len(sizes)} trainable tensors")
    hook = getattr(job, "slices", None)
    if not callable(hook):
        return _tied(state, balanced([[name] for name in sizes], sizes, count))
    chosen = hook(model, count)
    check(chosen, sizes, count)
    return [list(names) for names in chosen]


def check(chosen: object, sizes: Mapping[str, int], count: int) -> None:
    """JobError unless ``chosen`` is ``count`` non-empty lists that hold each trainable tensor once."""
    if not isinstance(chosen, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in chosen):
        raise JobError("the job's slices(model, count) must return a list of lists of state_dict names")
    if len(chosen) != count:
        raise JobError(f"the job's slices returned {len(chosen)} slices, {count} were asked for")
    seen: set[str] = set()
    for names in chosen:
        if not names:
            raise JobError("the job's slices returned an empty slice")
        for name in names:
            if name not in sizes:
                raise JobError(
                    f"the job's slices name {str(name)[:80]!r}, not a trainable tensor of the model"
                )
            if name in seen:
                raise JobError(f"the job's slices hold {name[:80]!r} twice")
            seen.add(name)
    missing = [name for name in sizes if name not in seen]
    if missing:
        raise JobError(f"the job's slices miss {len(missing)} trainable tensor(s), e.g. {missing[0][:80]!r}")


def balanced(units: Sequence[Sequence[str]], sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """``units`` (groups of names, in order) cut into ``count`` contiguous slices, the largest smallest.

    The least capacity that ``count`` greedy groups fit is found by bisection;
    then the units are cut greedily under it, closing a slice early where the
    units left are only as many as the slices still to fill (none is empty).
    """
    weights = [sum(sizes[n] for n in unit) for unit in units]
    if not 1 <= count <= len(units):
        raise JobError(f"{count} slices of {len(units)} parts: between 1 and {len(units)}")
    low, high = max(weights), sum(weights)
    while low < high:
        middle = (low + high) // 2
        if _groups(weights, middle) <= count:
            high = middle
        else:
            low = middle + 1
    slices: list[list[str]] = [[]]
    load = 0
    for index, (unit, weight) in enumerate(zip(units, weights, strict=True)):
        left_units, left_slices = len(units) - index, count - len(slices)
        if slices[-1] and (load + weight > low or left_units <= left_slices):
            slices.append([])
            load = 0
        slices[-1].extend(unit)
        load += weight
    return slices


def by_blocks(model: torch.nn.Module, count: int) -> list[list[str]]:
    """Slices cut between layers: ``blocks.N.*`` is one part, each other top-level module another.

    With more slices than parts, the cut goes between tensors instead.
    """
    sizes = trainable(model.state_dict())
    parts: dict[str, list[str]] = {}
    for name in sizes:
        head, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        key = f"{head}.{index}" if index.isdigit() else head
        parts.setdefault(key, []).append(name)
    units = list(parts.values()) if count <= len(parts) else [[name] for name in sizes]
    return balanced(units, sizes, count)


def slice_of(shard: int, count: int) -> int:
    """The slice shard ``shard`` of a round trains: ``shard mod count`` (a round of S or more covers all)."""
    return shard % count


def _groups(weights: Sequence[int], capacity: int) -> int:
    groups, load = 1, 0
    for weight in weights:
        if load and load + weight > capacity:
            groups, load = groups + 1, 0
        load += weight
    return groups


def _tied(state: Mapping[str, torch.Tensor], slices: list[list[str]]) -> list[list[str]]:
    """Names of one tensor (tied weights) all go to the slice of the first: one tensor, one slice."""
    first: dict[int, int] = {}
    out: list[list[str]] = [[] for _ in slices]
    for index, names in enumerate(slices):
        for name in names:
            tensor = state[name]
            pointer = tensor.data_ptr() if tensor.numel() else -1 - len(first)  # empty: never tied
            out[first.setdefault(pointer, index)].append(name)
    if any(not names for names in out):
        raise JobError("the model's tied tensors leave a slice empty: choose fewer --slices")
    return out
