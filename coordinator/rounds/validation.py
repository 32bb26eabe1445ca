"""Checks on what untrusted volunteers return, before anything touches the global model.

Pure functions, no I/O. Each check returns ``None`` when the input is acceptable, or a short
human reason (it lands in the run's JSON ``rejections`` and in logs); none of them raises on
bad volunteer input, only on a programming error (such as a non-positive limit).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

# Norms are accumulated per row of this many elements in float32, then summed in float64:
# as accurate as a float64 pass, at the speed of a float32 dot product.
_NORM_ROW = 1 << 16
_MAX_NAMES = 3

Reference = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def check_delta(delta: Mapping[str, torch.Tensor], reference: Reference) -> str | None:
    """Why this delta cannot be merged (keys, shapes, dtypes, finiteness), or None if it can."""
    if not isinstance(delta, Mapping):
        return "delta is not a map of tensors"
    missing = [name for name in reference if name not in delta]
    if missing:
        return f"missing tensors: {_names(missing)}"
    extra = [name for name in delta if name not in reference]
    if extra:
        return f"unexpected tensors: {_names(extra)}"
    for name, (shape, dtype) in reference.items():
        tensor = delta[name]
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return f"{_short(name)} is not a dense tensor"
        if tuple(tensor.shape) != tuple(shape):
            return f"{_short(name)} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        if tensor.dtype != dtype:
            return f"{_short(name)} has dtype {_dtype(tensor.dtype)}, expected {_dtype(dtype)}"
    # Structure first: it is cheap, and finiteness needs a full pass over the values.
    for tensor in delta.values():
        if not all_finite(tensor):
            return "non-finite values"
    return None


def check_meta(meta: Mapping[str, Any], *, base_version: int, max_samples: int) -> str | None:
    """Why a shard's summary (samples, base_version, train_loss) is unacceptable, or None."""
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    if not isinstance(meta, Mapping):
        return "meta is not a map"
    samples = meta.get("samples")
    if samples is None:
        return "missing samples"
    if not _is_int(samples):
        return f"samples must be an integer, got {_type(samples)}"
    if samples <= 0:
        return f"samples must be positive, got {samples}"
    if samples > max_samples:
        return f"samples {samples} exceeds the limit {max_samples}"
    version = meta.get("base_version")
    if version is None:
        return "missing base_version"
    if not _is_int(version):
        return f"base_version must be an integer, got {_type(version)}"
    if version != base_version:
        return f"base_version {version} does not match the round's {base_version}"
    loss = meta.get("train_loss")
    if loss is not None:
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            return f"train_loss must be a number or null, got {_type(loss)}"
        if not math.isfinite(loss):
            return "train_loss is not finite"
    return None


def delta_norm(delta: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> float:
    """Global L2 norm of the floating-point tensors (int buffers are not trained).

    float32 within rows of 65536 values, float64 across rows and tensors: relative error
    ~1e-7 at memory speed, where one float32 pass over 25M values is off by ~1e-4.
    """
    tensors = delta.values() if isinstance(delta, Mapping) else delta
    total = 0.0
    small: list[torch.Tensor] = []  # normed together: a model's many small tensors cost one call
    for tensor in tensors:
        if not tensor.is_floating_point():
            continue
        if tensor.dtype == torch.float32 and tensor.numel() <= _NORM_ROW:
            small.append(tensor.detach())
        else:
            total += _sum_of_squares(tensor)
    if small:
        together = torch.stack(torch._foreach_norm(small)).double().square().sum().item()
        # a float32 square overflows above ~1.8e19: each tensor again, in float64 if need be
        total += together if math.isfinite(together) else sum(_sum_of_squares(t) for t in small)
    return math.sqrt(total)


def norm_outliers(norms: Mapping[int, float], max_ratio: float) -> dict[int, str]:
    """Shards whose delta norm exceeds max_ratio x the round's median norm (needs >= 3 norms)."""
    return screen_norms(norms, {shard: str(shard) for shard in norms}, max_ratio)


def screen_norms(
    norms: Mapping[int, float],
    owners: Mapping[int, str],
    max_ratio: float,
    model_norm: float | None = None,
    history: Sequence[float] = (),
) -> dict[int, str]:
    """Shards whose delta norm is out of scale, with one voice per volunteer.

    A volunteer's voice is the median of its shards' norms, so training many
    shards of a round does not move the yardstick. With three voices or more,
    a shard above ``max_ratio`` x the median voice is flagged. With fewer there
    is no crowd to compare with: the yardstick is the median of ``history``
    (the norms of voices merged in the run's recent rounds, ``accepted_norm``),
    else, before any round was merged, the model's own norm; a model at zero
    with no history yet has no yardstick and its round is left to the probe.
    Non-finite norms are always flagged.
    """
    if not max_ratio > 0:
        raise ValueError(f"max_ratio must be positive, got {max_ratio}")
    flagged = {shard: "non-finite norm" for shard, n in norms.items() if not math.isfinite(n)}
    by_owner: dict[str, list[float]] = {}
    for shard, norm in norms.items():
        if shard not in flagged:
            by_owner.setdefault(owners[shard], []).append(norm)
    voices = [statistics.median(values) for values in by_owner.values()]
    past = [n for n in history if math.isfinite(n) and n > 0]
    if len(voices) >= 3:
        yardstick, what = statistics.median(voices), "round median"
    elif past:
        yardstick, what = statistics.median(past), "median of recently merged voices"
    elif model_norm is not None and model_norm > 0:
        yardstick, what = model_norm, "model's norm"
    else:
        return flagged
    limit = max_ratio * yardstick
    for shard, norm in norms.items():
        if shard in flagged or norm <= limit:
            continue
        if yardstick > 0:
            ratio = _num(norm / yardstick)
            flagged[shard] = f"norm {_num(norm)} is {ratio}x the {what} (limit {_num(max_ratio)}x)"
        else:
            flagged[shard] = f"norm {_num(norm)} with a {what} of 0"
    return flagged


def accepted_norm(norms: Iterable[float]) -> float | None:
    """What one merged round adds to the norm history: its voices' lower median (None if none).

    The lower median of two voices is the smaller, so a wild voice merged beside
    an honest one cannot raise the yardstick of the rounds after it.
    """
    values = [n for n in norms if math.isfinite(n)]
    return statistics.median_low(values) if values else None


def printable(text: str, limit: int = 200) -> str:
    """Text a volunteer wrote, safe for logs and JSON: control characters escaped, length capped."""
    clipped = text[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in clipped)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when the tensor holds no NaN or infinity (integer tensors always do)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.numel() == 0:
        return True
    # A sum is finite only if every term is (NaN and inf propagate), and it runs ~30x faster
    # than torch.isfinite; an overflowing sum of finite values falls back to the exact check.
    if math.isfinite(abs(tensor.sum().item())):
        return True
    return bool(torch.isfinite(tensor).all())


def _sum_of_squares(tensor: torch.Tensor) -> float:
    """Sum of squares of one tensor: float32 rows combined in float64, float64 on overflow."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    rows = flat.numel() // _NORM_ROW
    head = flat[: rows * _NORM_ROW].view(rows, _NORM_ROW)
    total = torch.linalg.vector_norm(head, dim=1).double().square().sum().item()
    tail = flat[rows * _NORM_ROW :]
    total += float(torch.dot(tail, tail).double())
    if math.isinf(total) and all_finite(flat):
        # float32 squares overflow above ~1.8e19: redo this tensor in float64.
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2)
    return total


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type(value: object) -> str:
    return type(value).__name__


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def _names(names: list[str]) -> str:
    shown = ", ".join(_short(n) for n in sorted(map(str, names))[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return shown + (f" (+{more} more)" if more > 0 else "")


def _num(value: float) -> str:
    return f"{value:.6g}"
