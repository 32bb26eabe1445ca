"""The pure maths of aggregation: folding ``(sample_weight, delta)`` pairs into one update.

No I/O and no strategy state: ``coordinator.merging.strategies`` builds its classes on
these. Streaming sums fold each delta into preallocated float accumulators with
in-place ``add_`` as it is read (O(model) memory); the robust ones (median,
trimmed mean, Krum) need every delta at once. Accumulators are float32, or
float64 for float64 weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from coordinator.errors import StrategyError
from coordinator.rounds.validation import delta_norm
from serialization import TensorDict

WeightedDelta = tuple[float, Mapping[str, torch.Tensor]]


def float_keys(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Names that aggregation merges: floating-point tensors only (int buffers stay as they are)."""
    return [k for k, t in weights.items() if t.is_floating_point()]


def clip_scale(delta: Mapping[str, torch.Tensor], clip_norm: float | None) -> float:
    """Factor (<= 1) that brings the delta's global L2 norm down to at most ``clip_norm``."""
    if clip_norm is None:
        return 1.0
    norm = delta_norm(delta)
    if not math.isfinite(norm):
        raise StrategyError("cannot clip a delta with non-finite values; validate it first")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def weighted_sum(
    deltas: Iterable[WeightedDelta],
    template: Mapping[str, torch.Tensor],
    *,
    clip_norm: float | None = None,
    out: TensorDict | None = None,
) -> tuple[TensorDict, float, int]:
    """Fold (weight, delta) pairs into accumulators one at a time: O(model) memory.

    Returns ``(sum of weight * delta, total weight, count)`` over the keys of ``template``;
    with no deltas the sum is unspecified and count is 0. ``out`` (that layout) is reused:
    in-place ``add_`` into warm buffers runs at memory speed, fresh pages at a third of it.
    """
    acc = out if out is not None else empty_like(template)
    total, count = 0.0, 0
    for weight, delta in deltas:
        alpha = sample_weight(weight)
        check_delta_layout(delta, acc, list(acc))
        alpha *= clip_scale({k: delta[k] for k in acc}, clip_norm)
        for key, buf in acc.items():
            _fold(buf, delta[key], alpha, first=count == 0)
        total += float(weight)
        count += 1
        del delta  # drop our reference before the iterable makes the next delta
    if count and total <= 0:
        raise StrategyError("the round's deltas have a total sample weight of 0")
    return acc, total, count


def weighted_mean(deltas: Iterable[WeightedDelta], template: Mapping[str, torch.Tensor]) -> TensorDict:
    """Sample-weighted mean of the deltas over template's keys (zeros when there are none)."""
    acc, total, count = weighted_sum(deltas, template)
    for buf in acc.values():
        if count:
            buf.div_(total)
        else:
            buf.zero_()
    return acc


def coordinate_median(
    deltas: Sequence[Mapping[str, torch.Tensor]], template: Mapping[str, torch.Tensor]
) -> TensorDict:
    """Per-coordinate median (even count: mean of the two middle values) over template's keys."""
    out: TensorDict = {}
    n = len(deltas)
    for key, like in template.items():
        ordered = _stack(deltas, key, like).sort(dim=0).values
        if n % 2:
            out[key] = ordered[n // 2].clone()
        else:
            out[key] = (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def trimmed_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]], beta: float, template: Mapping[str, torch.Tensor]
) -> TensorDict:
    """Per-coordinate mean after dropping floor(beta*n) values at each end (0 <= beta < 0.5)."""
    n = len(deltas)
    cut = math.floor(beta * n + 1e-9)  # 1e-9: 0.29 * 100 must trim 29, not 28
    out: TensorDict = {}
    for key, like in template.items():
        ordered = _stack(deltas, key, like).sort(dim=0).values
        out[key] = ordered[cut : n - cut].mean(dim=0)
    return out


def krum_select(deltas: Sequence[Mapping[str, torch.Tensor]], f: int, keys: Sequence[str]) -> list[int]:
    """Multi-Krum pick: indices of the n-F deltas with the smallest neighbour-distance scores.

    Score = sum of squared distances to the n-F-2 nearest other deltas. Krum's guarantee needs
    n > 2F+2; with fewer deltas it degrades instead of failing: scores use
    max(1, n-F-2) neighbours and the max(1, n-F) best are kept; with n <= 2 there is nothing
    to compare, so all are kept. Ties go to the earlier delta.
    """
    n = len(deltas)
    if n <= 2:
        return list(range(n))
    dist = pairwise_sq_distances(deltas, keys)
    dist.fill_diagonal_(math.inf)
    neighbours = min(n - 1, max(1, n - f - 2))
    scores = dist.sort(dim=1).values[:, :neighbours].sum(dim=1).tolist()
    best = sorted(range(n), key=lambda i: (scores[i], i))[: max(1, n - f)]
    return sorted(best)


def pairwise_sq_distances(
    deltas: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str], chunk: int = 1 << 18
) -> torch.Tensor:
    """(n, n) float64 squared L2 distances via Gram matrices over column chunks (bounded memory)."""
    n = len(deltas)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for key in keys:
        flats = [d[key].reshape(-1) for d in deltas]
        for start in range(0, flats[0].numel(), chunk):
            block = torch.stack([x[start : start + chunk] for x in flats]).double()
            gram = block @ block.T
            sq = gram.diagonal()
            dist += sq[:, None] + sq[None, :] - 2 * gram
    return dist.clamp_(min=0)


def sample_weight(weight: float) -> float:
    value = float(weight)
    if not (math.isfinite(value) and value >= 0):
        raise StrategyError(f"sample weight must be a finite number >= 0, got {weight!r}")
    return value


def clipped(
    delta: Mapping[str, torch.Tensor], keys: list[str], clip_norm: float | None
) -> Mapping[str, torch.Tensor]:
    scale = clip_scale({k: delta[k] for k in keys if k in delta}, clip_norm)
    return delta if scale == 1.0 else {k: delta[k] * scale for k in keys}


def check_delta_layout(
    delta: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], keys: list[str]
) -> None:
    # add_ would silently broadcast a (1,)-shaped delta over a whole tensor: refuse instead.
    for key in keys:
        value = delta.get(key)
        if value is None:
            raise StrategyError(f"delta lacks tensor {key!r}; validate deltas first")
        if value.shape != like[key].shape:
            raise StrategyError(
                f"delta tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(like[key].shape)}"
            )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def empty_like(template: Mapping[str, torch.Tensor]) -> TensorDict:
    return {k: torch.empty(t.shape, dtype=_acc_dtype(t.dtype), device=t.device) for k, t in template.items()}


def same_layout(acc: TensorDict, weights: TensorDict, keys: list[str]) -> bool:
    return list(acc) == keys and all(
        acc[k].shape == weights[k].shape and acc[k].dtype == _acc_dtype(weights[k].dtype) for k in keys
    )


def _stack(deltas: Sequence[Mapping[str, torch.Tensor]], key: str, like: torch.Tensor) -> torch.Tensor:
    return torch.stack([d[key].to(_acc_dtype(like.dtype)) for d in deltas])


def _fold(buf: torch.Tensor, value: torch.Tensor, alpha: float, *, first: bool) -> None:
    """buf = alpha * value on the first delta (no separate zeroing pass), else buf += alpha * value."""
    if first and value.dtype == buf.dtype:
        torch.mul(value, alpha, out=buf)
    elif first:
        buf.copy_(value).mul_(alpha)
    else:
        buf.add_(value, alpha=alpha)
