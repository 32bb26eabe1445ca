"""Aggregation strategies: the maths that merge one round's deltas into the next global model.

A delta is ``w_local - w_global``; deltas arrive as an iterable of ``(sample_weight, delta)``.
Streaming strategies (fedavg, fedavgm, diloco, fedadam) fold each delta into preallocated
float accumulators with in-place ``add_`` as it is read, so memory stays O(model) however
many shards a round has. Robust strategies (median, trimmed-mean, krum) need all deltas in
memory. Only floating-point tensors are merged; other tensors (int buffers such as
``num_batches_tracked``) keep the values in ``weights``. Accumulators and optimizer state are
float32, or float64 for float64 weights.

Defaults (``make_strategy``), all overridable by ``server_lr`` / ``momentum``:
- ``fedavg``: server_lr 1.0 (plain sample-weighted FedAvg, McMahan et al. 2017).
- ``diloco``: outer SGD, Nesterov, server_lr 0.7, momentum 0.9 (Douillard et al. 2023).
- ``fedavgm``: the same Nesterov outer SGD with server_lr 1.0, momentum 0.9 (Hsu et al. 2019
  use heavy-ball momentum; Nesterov is kept so the two names differ only in defaults).
- ``fedadam``: Reddi et al. 2021 without bias correction, server_lr 0.01, beta1 0.9
  (``momentum`` sets it), beta2 0.99, tau 1e-3.
- ``median``, ``trimmed-mean:B``, ``krum:F``: server_lr 1.0 applied to the robust aggregate.
  Median and trimmed mean are unweighted per coordinate; Krum averages its pick by samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from coordinator.errors import StrategyError
from coordinator.merging.aggregate import (
    WeightedDelta,
    check_delta_layout,
    clipped,
    coordinate_median,
    float_keys,
    krum_select,
    same_layout,
    sample_weight,
    trimmed_mean,
    weighted_mean,
    weighted_sum,
)
from serialization import TensorDict

DILOCO_DEFAULTS = {"server_lr": 0.7, "momentum": 0.9}
FEDAVGM_DEFAULTS = {"server_lr": 1.0, "momentum": 0.9}
FEDADAM_DEFAULTS = {"server_lr": 0.01, "momentum": 0.9, "beta2": 0.99, "tau": 1e-3}
VALID_FORMS = (
    "fedavg, fedavgm, diloco, fedadam, median, trimmed-mean:B (0 <= B < 0.5), krum:F (F >= 0 integer)"
)
STRATEGY_HELP = """\
fedavg          sample-weighted mean of the deltas x server lr (default 1.0); streams
fedavgm         outer SGD with Nesterov momentum on the mean delta (lr 1.0, momentum 0.9); streams
diloco          the same outer SGD with DiLoCo's defaults (lr 0.7, momentum 0.9); streams
fedadam         outer Adam on the mean delta (lr 0.01, beta1 0.9 = --momentum, beta2 0.99,
                tau 1e-3); streams
median          coordinate-wise median x server lr (1.0); needs all deltas in memory
trimmed-mean:B  per coordinate, drop the fraction B (0 <= B < 0.5) at each end and average
                the rest; needs all deltas in memory
krum:F          multi-Krum tolerating F bad deltas: sample-weighted mean of the n-F deltas
                closest to their n-F-2 nearest neighbours; needs all deltas in memory
Any strategy: --clip-norm C first scales each delta to a global L2 norm of at most C."""


class Strategy:
    """Merges one round's deltas into new weights; optimizer state (momentum, moments) lives here."""

    name: str = "fedavg"
    streaming: bool = True

    def __init__(self, *, server_lr: float = 1.0, clip_norm: float | None = None) -> None:
        self.server_lr = _positive("server_lr", server_lr)
        self.clip_norm = None if clip_norm is None else _positive("clip_norm", clip_norm)
        self._scratch: TensorDict | None = None  # reused accumulators: no fresh pages per round

    def aggregate(
        self, weights: TensorDict, deltas: Iterable[WeightedDelta], *, copy: bool = False
    ) -> TensorDict:
        """Update ``weights`` in place from the round's deltas and return it (empty: unchanged).

        With ``copy`` the update goes into a copy of ``weights`` (returned), made
        once the deltas are summed, so it never sits beside a decoded delta.
        """
        keys = float_keys(weights)
        with torch.no_grad():
            merged = self._merge(weights, keys, deltas)
            if copy:
                weights = {k: v.clone() for k, v in weights.items()}
            if merged is not None:
                self._apply(weights, *merged)
        return weights

    def state_dict(self) -> TensorDict:
        """Optimizer state as a flat tensor map (copies), e.g. ``momentum/layer.weight``."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore state saved by ``state_dict`` so a restarted coordinator continues identically."""
        if state:
            raise StrategyError(f"{self.name} keeps no state, got {_few(state)}")

    def _merge(
        self, weights: TensorDict, keys: list[str], deltas: Iterable[WeightedDelta]
    ) -> tuple[TensorDict, float] | None:
        """``(update, factor)`` with the round's combined delta = factor * update; None if empty."""
        if self._scratch is None or not same_layout(self._scratch, weights, keys):
            self._scratch = None
        total_sum, total, count = weighted_sum(
            deltas, {k: weights[k] for k in keys}, clip_norm=self.clip_norm, out=self._scratch
        )
        self._scratch = total_sum
        # Divide inside the update (alpha) rather than in a pass of its own: 1 pass in 17 saved.
        return (total_sum, 1.0 / total) if count else None

    def _apply(self, weights: TensorDict, update: TensorDict, factor: float) -> None:
        for key, value in update.items():
            weights[key].add_(value, alpha=self.server_lr * factor)


class FedAvg(Strategy):
    """Sample-weighted mean of the deltas, scaled by the server learning rate."""


class OuterSGD(Strategy):
    """Outer SGD with Nesterov momentum on the pseudo-gradient ``-mean`` (fedavgm, DiLoCo).

    With ``delay`` N > 1 (asynchronous runs: one synchronous round's worth of
    buffers) the momentum is *delayed* (after Async Local-SGD's delayed
    Nesterov, Liu et al. 2024): every buffer still takes its plain step
    ``lr * mean``, but the momentum buffer moves only once every N buffers,
    by the average of their means. A buffer of stale deltas then weighs 1/N in
    the momentum instead of being carried by it into every later step. N = 1 is
    exactly Nesterov.
    """

    def __init__(
        self,
        name: str,
        *,
        server_lr: float,
        momentum: float,
        clip_norm: float | None = None,
        delay: int = 1,
    ) -> None:
        super().__init__(server_lr=server_lr, clip_norm=clip_norm)
        self.name = name
        self.momentum = _unit("momentum", momentum)
        if not (isinstance(delay, int) and delay >= 1):
            raise StrategyError(f"momentum delay must be a whole number >= 1, got {delay!r}")
        self.delay = delay
        self._buf: TensorDict = {}
        self._pending: TensorDict = {}  # the mean of the buffers since the momentum last moved
        self._steps = 0  # buffers merged since then

    def state_dict(self) -> TensorDict:
        state = {f"momentum/{k}": v.clone() for k, v in self._buf.items()}
        if self.delay > 1:
            state.update({f"pending/{k}": v.clone() for k, v in self._pending.items()})
            state["steps/since_momentum"] = torch.tensor(self._steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        parts = _unprefix(self.name, state, ("momentum", "pending", "steps"))
        self._buf, self._pending = parts["momentum"], parts["pending"]
        steps = parts["steps"].get("since_momentum")
        self._steps = int(steps) if steps is not None and steps.numel() == 1 else 0
        if self._pending and self._pending.keys() != self._buf.keys():
            raise StrategyError(f"{self.name} state: pending and momentum name different tensors")

    def _apply(self, weights: TensorDict, update: TensorDict, factor: float) -> None:
        # torch.optim.SGD(nesterov=True) with g = -mean: buf = mu*buf + g; w -= lr*(g + mu*buf).
        _ensure_state(self.name, "momentum", self._buf, update)
        lr, mu, n = self.server_lr, self.momentum, self.delay
        if n == 1:
            for key, value in update.items():  # mean = factor * value
                buf = self._buf[key].mul_(mu).add_(value, alpha=factor)
                weights[key].add_(value, alpha=lr * factor).add_(buf, alpha=lr * mu)
            return
        _ensure_state(self.name, "pending", self._pending, update)
        self._steps += 1
        moves = self._steps >= n
        for key, value in update.items():
            pending = self._pending[key].add_(value, alpha=factor / n)
            weights[key].add_(value, alpha=lr * factor)
            if moves:
                buf = self._buf[key].mul_(mu).add_(pending)
                weights[key].add_(buf, alpha=lr * mu)
                pending.zero_()
        if moves:
            self._steps = 0


class FedAdam(Strategy):
    """Outer Adam on the mean delta (Reddi et al. 2021): per-coordinate adaptive server steps."""

    name = "fedadam"

    def __init__(
        self,
        *,
        server_lr: float,
        beta1: float,
        beta2: float = FEDADAM_DEFAULTS["beta2"],
        tau: float = FEDADAM_DEFAULTS["tau"],
        clip_norm: float | None = None,
    ) -> None:
        super().__init__(server_lr=server_lr, clip_norm=clip_norm)
        self.beta1, self.beta2 = _unit("momentum (beta1)", beta1), _unit("beta2", beta2)
        self.tau = _positive("tau", tau)
        self._m: TensorDict = {}
        self._v: TensorDict = {}

    def state_dict(self) -> TensorDict:
        state = {f"adam_m/{k}": v.clone() for k, v in self._m.items()}
        state.update({f"adam_v/{k}": v.clone() for k, v in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        parts = _unprefix(self.name, state, ("adam_m", "adam_v"))
        if parts["adam_m"].keys() != parts["adam_v"].keys():
            raise StrategyError("fedadam state: adam_m and adam_v name different tensors")
        self._m, self._v = parts["adam_m"], parts["adam_v"]

    def _apply(self, weights: TensorDict, update: TensorDict, factor: float) -> None:
        # m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;  w += lr m / (sqrt(v) + tau)
        _ensure_state(self.name, "adam_m", self._m, update)
        _ensure_state(self.name, "adam_v", self._v, update)
        for key, mean in update.items():
            mean.mul_(factor)
            m = self._m[key].mul_(self.beta1).add_(mean, alpha=1 - self.beta1)
            v = self._v[key].mul_(self.beta2).addcmul_(mean, mean, value=1 - self.beta2)
            denom = torch.sqrt(v, out=mean).add_(self.tau)  # the mean is spent: reuse its buffer
            weights[key].addcdiv_(m, denom, value=self.server_lr)


class _Robust(Strategy):
    """Base of the strategies that need every delta of the round in memory at once."""

    streaming = False

    def _merge(
        self, weights: TensorDict, keys: list[str], deltas: Iterable[WeightedDelta]
    ) -> tuple[TensorDict, float] | None:
        items: list[WeightedDelta] = []
        for weight, delta in deltas:
            check_delta_layout(delta, weights, keys)
            items.append((sample_weight(weight), clipped(delta, keys, self.clip_norm)))
        return (self._robust(items, {k: weights[k] for k in keys}), 1.0) if items else None

    def _robust(self, items: list[WeightedDelta], template: TensorDict) -> TensorDict:
        raise NotImplementedError


class Median(_Robust):
    """Coordinate-wise median: one wild delta cannot move any coordinate far."""

    name = "median"

    def _robust(self, items: list[WeightedDelta], template: TensorDict) -> TensorDict:
        return coordinate_median([d for _, d in items], template)


class TrimmedMean(_Robust):
    """Coordinate-wise mean after dropping the fraction ``beta`` of values at each end."""

    def __init__(self, beta: float, *, server_lr: float = 1.0, clip_norm: float | None = None):
        super().__init__(server_lr=server_lr, clip_norm=clip_norm)
        if not (math.isfinite(beta) and 0 <= beta < 0.5):
            raise StrategyError(f"trimmed-mean B must satisfy 0 <= B < 0.5, got {beta}")
        self.beta, self.name = beta, f"trimmed-mean:{beta:g}"

    def _robust(self, items: list[WeightedDelta], template: TensorDict) -> TensorDict:
        return trimmed_mean([d for _, d in items], self.beta, template)


class Krum(_Robust):
    """Multi-Krum: average the deltas that sit closest to their neighbours, tolerating F bad."""

    def __init__(self, f: int, *, server_lr: float = 1.0, clip_norm: float | None = None):
        super().__init__(server_lr=server_lr, clip_norm=clip_norm)
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise StrategyError(f"krum F must be an integer >= 0, got {f!r}")
        self.f, self.name = f, f"krum:{f}"
        self.last_selected: list[int] = []  # indices into the last round's deltas, for logs

    def _robust(self, items: list[WeightedDelta], template: TensorDict) -> TensorDict:
        self.last_selected = krum_select([d for _, d in items], self.f, list(template))
        return weighted_mean([items[i] for i in self.last_selected], template)


def make_strategy(
    spec: str,
    *,
    server_lr: float | None = None,
    momentum: float | None = None,
    clip_norm: float | None = None,
    momentum_delay: int = 1,
) -> Strategy:
    """Build a strategy from its CLI spec (``fedavg``, ``krum:1``...); StrategyError if bad.

    ``momentum_delay``: how many merges the outer momentum of ``fedavgm`` and
    ``diloco`` waits between moves (``OuterSGD``; asynchronous runs).
    """
    name, sep, arg = str(spec).strip().lower().partition(":")
    if name in ("fedavg", "fedavgm", "diloco", "fedadam", "median") and sep:
        raise StrategyError(f"strategy {spec!r} takes no parameter: expected {VALID_FORMS}")
    if name not in ("fedavgm", "diloco", "fedadam") and momentum is not None:
        raise StrategyError(f"strategy {spec!r} has no momentum: use fedavgm, diloco or fedadam")
    if name in ("fedavgm", "diloco"):
        defaults = DILOCO_DEFAULTS if name == "diloco" else FEDAVGM_DEFAULTS
        lr, mu = _or(server_lr, defaults["server_lr"]), _or(momentum, defaults["momentum"])
        return OuterSGD(name, server_lr=lr, momentum=mu, clip_norm=clip_norm, delay=momentum_delay)
    if name == "fedadam":
        lr, mu = _or(server_lr, FEDADAM_DEFAULTS["server_lr"]), _or(momentum, FEDADAM_DEFAULTS["momentum"])
        return FedAdam(server_lr=lr, beta1=mu, clip_norm=clip_norm)
    lr = _or(server_lr, 1.0)
    if name == "fedavg":
        return FedAvg(server_lr=lr, clip_norm=clip_norm)
    if name == "median":
        return Median(server_lr=lr, clip_norm=clip_norm)
    if name == "trimmed-mean" and sep:
        beta = _parse(arg, float)
        if beta is None or not (math.isfinite(beta) and 0 <= beta < 0.5):
            raise StrategyError(f"bad strategy {spec!r}: B must satisfy 0 <= B < 0.5; expected {VALID_FORMS}")
        return TrimmedMean(beta, server_lr=lr, clip_norm=clip_norm)
    if name == "krum" and sep:
        f = _parse(arg, int)
        if f is None or f < 0:
            raise StrategyError(f"bad strategy {spec!r}: F must be an integer >= 0; expected {VALID_FORMS}")
        return Krum(int(f), server_lr=lr, clip_norm=clip_norm)
    raise StrategyError(f"unknown strategy {spec!r}: expected {VALID_FORMS}")


def _ensure_state(owner: str, kind: str, state: TensorDict, update: TensorDict) -> None:
    """Create zero state on the first round; refuse state that does not fit the model."""
    if not state:
        state.update({k: torch.zeros_like(v) for k, v in update.items()})
        return
    if state.keys() != update.keys() or any(state[k].shape != v.shape for k, v in update.items()):
        raise StrategyError(f"{owner} {kind} state does not match the model's tensors")
    for key, value in update.items():
        if state[key].dtype != value.dtype:
            state[key] = state[key].to(value.dtype)


def _unprefix(
    owner: str, state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]
) -> dict[str, TensorDict]:
    parts: dict[str, TensorDict] = {p: {} for p in prefixes}
    for key, value in state.items():
        prefix, sep, name = key.partition("/")
        if not sep or prefix not in parts or not isinstance(value, torch.Tensor):
            raise StrategyError(
                f"{owner} state key {key!r} is not one of {', '.join(p + '/NAME' for p in prefixes)}"
            )
        parts[prefix][name] = value.detach().clone()
    return parts


def _parse(text: str, kind: type[float | int]) -> float | None:
    try:
        return kind(text)
    except ValueError:
        return None


def _positive(option: str, value: float) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise StrategyError(f"{option} must be a positive finite number, got {value!r}")
    return number


def _unit(option: str, value: float) -> float:
    number = float(value)
    if not (0 <= number < 1):
        raise StrategyError(f"{option} must satisfy 0 <= {option} < 1, got {value!r}")
    return number


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _few(state: Mapping[str, object]) -> str:
    names = sorted(state)[:3]
    return ", ".join(names) + (" ..." if len(state) > 3 else "")
