"""What the aggregator measures of each voice for ``init --verify probe``; the rules are ``rules``.

* A voice's *gain* (``Prober.gain``): how much it lowers the loss on a small
  fixed probe set (the job's ``probe_batches()``, else its evaluation) when
  applied alone to the round's base model at its share of the merge (``1/n``
  of a full step), and its *cost*, the probe's resolution for a step of its
  length (``Prober.cost``). Each is one probe pass, so each is measured only
  when a verdict needs it (``coordinator.merging.rules.judge``).
* Its *agreement* (``Consensus``): the cosine between its direction and the
  round's other voices' directions, summed with their volunteers' reputations
  as weights, measured between count sketches (``sketch``).
* Copies (``copies``): voices that copy another's direction or the last
  published update are refused.
* Reputation (``next_reputation``, ``weigh``): each volunteer's, in [0, 1] from
  0.5, moves toward 1 with every merged voice and toward 0 with every rejected
  one; the merge weighs voices by it, so a volunteer that was caught before
  counts less even when it is not.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from coordinator.merging.rules import scaled_cost
from coordinator.rounds.validation import delta_norm
from jobs.interface import Job
from serialization import TensorDict

# A voice whose direction has at least this cosine with another voice's of the round, or with
# the last published update, is a copy (honest voices measured at most 0.985, docs/SECURITY.md).
COPY_COSINE = 0.999
# Deltas of more values than this are compared for copies through a count sketch of this size.
SKETCH = 1 << 16
# A count sketch of a delta of at most this many values reuses its buckets and signs (5 bytes a
# value, 20 MiB at most), made once per delta size: hashing was 80% of a sketch (0.86M values:
# 29 ms, 6 ms with them kept), and a round sketches every voice.
SKETCH_CACHE = 1 << 22
# From this many voices, pairs are compared for copies only when PREFILTER random buckets of
# their sketches have a cosine of at least PREFILTER_COSINE (``_pairs``): 2048 buckets estimate
# a cosine within about 0.02, and a copy's is at least 0.999.
PREFILTER_FROM = 64
PREFILTER = 2048
PREFILTER_COSINE = 0.9
_RANDOM = secrets.SystemRandom()
_LAYOUT: dict[str, Any] = {}
START_REPUTATION = 0.5
# How far one round moves a reputation toward 1 (merged) or 0 (rejected).
REPUTATION_STEP = 0.2
# Two trainings of one shard agree when their deltas point the same way (cosine) at about
# the same length: GPUs are not bit-reproducible, so equality is not asked for.
REPLICA_COSINE = 0.9
REPLICA_NORM_RATIO = 1.25


def probe_loss(job: Job, model: torch.nn.Module) -> float:
    """Mean loss of ``model`` on the job's probe batches, else its ``eval_loss``."""
    batches = getattr(job, "probe_batches", None)
    if batches is None:
        return float(job.evaluate(model)["eval_loss"])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(job.loss(model, batch)) for batch in batches()]
    finally:
        model.train(was_training)
    return sum(losses) / max(1, len(losses))


class Prober:
    """Measures voices' gains against one base model, with one model instance for all of them.

    The model is built, and the base's probe loss measured, at the first gain
    asked for: a round whose verdicts need no probe pass pays for none.
    """

    def __init__(self, job: Job, base: TensorDict) -> None:
        self.job = job
        self.base = base
        self._model: torch.nn.Module | None = None
        self._live: dict[str, torch.Tensor] = {}  # the model's own tensors: a probe moves them in place
        self._base_loss: float | None = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self.job.build_model()
            self._model.load_state_dict(self.base)
            self._live = self._model.state_dict()
        return self._model

    @property
    def base_loss(self) -> float:
        if self._base_loss is None:
            self._base_loss = probe_loss(self.job, self.model)
        return self._base_loss

    def gain(self, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> float:
        """How much ``scale * delta`` added to the base lowers the probe loss (negative: raises it).

        The merge moves the model by about ``1/n`` of each of ``n`` voices, so
        that is the step to probe with: a voice's share, where its first-order
        effect (its direction) dominates the curvature of a full step.
        """
        base_loss = self.base_loss  # the base's own pass first, while the model holds the base
        with (
            torch.no_grad()
        ):  # in place: a model's worth of allocation and load_state_dict was 15% of a probe
            for name, tensor in self._live.items():
                tensor.copy_(self.base[name])
                if name in delta:
                    if delta[name].shape != tensor.shape:  # add_ would broadcast it
                        raise ValueError(f"{name}: a delta of shape {tuple(delta[name].shape)}")
                    tensor.add_(delta[name].to(tensor.dtype), alpha=scale)
        return base_loss - probe_loss(self.job, self.model)

    def cost(self, delta: Mapping[str, torch.Tensor], scale: float, gain: float) -> float:
        """The probe's resolution for this step: what it costs whatever its direction.

        Half the loss a step and its opposite add together (``gain`` is the
        step's own): the curvature term, which any direction of that length
        pays. Gains that differ by less than it are within the probe's noise,
        as near convergence, where honest steps are mostly noise.
        """
        return max(0.0, -(gain + self.gain(delta, -scale)) / 2)


def lone_resolution(
    prober: Prober,
    delta: Mapping[str, torch.Tensor],
    gain: float,
    usual_norm: float | None,
    last: Mapping[str, torch.Tensor] | None,
) -> float:
    """The probe's resolution for a round of one voice (``delta``, probed at a full step).

    The cost of the run's last published update at the usual norm: a step of
    the length and kind honest rounds took. Before any update, the voice's own
    step at the usual norm (or its own, before any merge).
    """
    size = delta_norm(last) if last is not None else 0.0
    if last is not None and size > 0:
        scale = (usual_norm or size) / size
        return prober.cost(last, scale, prober.gain(last, scale))
    return scaled_cost(prober.cost(delta, 1.0, gain), delta_norm(delta), usual_norm)


def copies(
    sketches: Mapping[str, torch.Tensor], last: torch.Tensor | None, reputations: Mapping[str, float | None]
) -> dict[str, str]:
    """Voices whose direction nearly copies another voice's or the last published update (``copy``).

    ``sketches`` and ``last`` come from ``sketch``. Of two voices that copy each
    other, the one of lower reputation is refused; both at equal reputation,
    since nothing tells which came first.
    """
    reasons: dict[str, str] = {}
    names = list(sketches)
    for name in names:
        if last is not None:
            cosine = _cosine(sketches[name], last)
            if cosine >= COPY_COSINE:
                reasons[name] = f"copy: the last published update, re-sent (cosine {cosine:.4f})"
                continue
    for first, second in _pairs(sketches, names):
        cosine = _cosine(sketches[first], sketches[second])
        if cosine < COPY_COSINE:
            continue
        rank = {n: _reputation(reputations.get(n)) for n in (first, second)}
        for name, other in ((first, second), (second, first)):
            if rank[name] <= rank[other] and name not in reasons:
                reasons[name] = f"copy: nearly the same direction as {other}'s delta (cosine {cosine:.4f})"
    return reasons


def _pairs(sketches: Mapping[str, torch.Tensor], names: list[str]) -> Iterable[tuple[str, str]]:
    """The pairs of voices whose sketches may be copies, each once, in the order of ``names``.

    Every pair in a small round. In a round of ``PREFILTER_FROM`` voices or more with hashed
    sketches (``SKETCH`` buckets), only the pairs whose ``PREFILTER`` buckets drawn at random
    (with ``secrets``, so no one can put a copy's differences where the check looks) have a
    cosine of at least ``PREFILTER_COSINE``, found with one matrix product: the round's pairs
    grow as the square of its voices (500k at 1,000 voices, 60 us each compared whole), and a
    copy's buckets agree with its original's as the whole sketches do.
    """
    if len(names) < PREFILTER_FROM or any(sketches[name].shape != (SKETCH,) for name in names):
        return [(first, second) for i, first in enumerate(names) for second in names[i + 1 :]]
    drawn = torch.tensor(secrets.SystemRandom().sample(range(SKETCH), PREFILTER))
    head = torch.stack([sketches[name][drawn] for name in names])
    norms = head.norm(dim=1, keepdim=True)
    unit = (head / norms.clamp_min(1e-300)).float()
    near = (unit @ unit.T) >= PREFILTER_COSINE
    empty = norms == 0  # nothing to compare the heads by: compared whole
    near |= empty | empty.T
    return [(names[i], names[j]) for i, j in torch.triu(near, diagonal=1).nonzero().tolist()]


def sketch(
    delta: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The delta's floating-point values in a fixed order, or a count sketch of ``SKETCH`` of them.

    Cosines between sketches estimate cosines between deltas (within about
    ``1/sqrt(SKETCH)`` = 0.004 for large ones, exactly for small ones), so the
    round's pairs are compared without holding their deltas. With ``minus``,
    the sketch of ``delta - minus`` (the names both hold), formed one tensor
    at a time: the last update of a model is sketched without a third model.
    """
    names = [
        name for name in sorted(delta) if delta[name].is_floating_point() and (minus is None or name in minus)
    ]

    def values(name: str) -> torch.Tensor:
        flat = delta[name].detach().reshape(-1)
        return flat if minus is None else flat - minus[name].detach().reshape(-1).to(flat.dtype)

    total = sum(delta[name].numel() for name in names)
    if total <= SKETCH:
        parts = [values(name).double() for name in names]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    # Buckets sum in float32: four times faster than float64 (0.86M values: 1.9 against 7.4 ms),
    # and its rounding moves a cosine far less than the sketch's own error (about 0.004).
    out = torch.zeros(SKETCH, dtype=torch.float32)
    cached = _sketch_layout(total) if total <= SKETCH_CACHE else None
    offset = 0
    step = 1 << 20
    for name in names:
        flat = values(name)
        for start in range(0, flat.numel(), step):
            chunk = flat[start : start + step].float()
            at = offset + start
            if cached is None:
                buckets, signs = _sketch_hashes(at, chunk.numel())
            else:
                buckets, signs = cached[0][at : at + chunk.numel()], cached[1][at : at + chunk.numel()]
            out.index_add_(0, buckets, chunk * signs)
        offset += flat.numel()
        del flat
    return out.double()


def cheap_to_sketch(delta: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``sketch`` takes a few milliseconds (its layout kept: at most ``SKETCH_CACHE`` values),
    not the seconds of hashing a larger delta's every value as it goes."""
    return sum(t.numel() for t in delta.values() if t.is_floating_point()) <= SKETCH_CACHE


def _sketch_hashes(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The count sketch's bucket and sign of values ``start`` to ``start + count`` of a delta."""
    index = torch.arange(start, start + count, dtype=torch.int64)
    hashed = (index * 48271 + 11) % 2147483647
    hashed = (hashed * 48271) % 2147483647
    return hashed % SKETCH, ((hashed // SKETCH) % 2).to(torch.int8) * 2 - 1


def _sketch_layout(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sketch_hashes`` of a whole delta of ``total`` values, made once per size and kept.

    Kept as one tuple, replaced whole: the intake loop sketches uploads beside
    the merge, and a reader must never pair one size's buckets with another's signs.
    """
    kept = _LAYOUT.get("layout")
    if kept is None or kept[0] != total:
        buckets, signs = _sketch_hashes(0, total)
        kept = (total, buckets.int(), signs)
        _LAYOUT["layout"] = kept
    return kept[1], kept[2]


def _reputation(value: float | None) -> float:
    return START_REPUTATION if value is None else value


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return 0.0
    norms = float(a.norm()) * float(b.norm())
    return float(torch.dot(a, b)) / norms if norms > 0 else 0.0


class Consensus:
    """The round's voices' unit directions summed with reputation weights, for each one's agreement.

    Two passes over the voices (``add`` each, then ``agreement`` of each) keep
    one delta in memory at a time besides the sum; a voice's agreement leaves
    its own direction out of the sum.
    """

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self._total_sq: float | None = None  # |sum|^2, once every voice is added

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        self._total_sq = None
        scale = weight / max(delta_norm(delta), 1e-30)
        for name, tensor in _floats(delta):
            if name in self.total:
                self.total[name].add_(tensor.float(), alpha=scale)
            else:
                self.total[name] = tensor.float() * scale

    def agreement(self, delta: Mapping[str, torch.Tensor], weight: float) -> float:
        """Cosine of ``delta`` with the sum of the *other* voices' weighted directions (0 if none)."""
        norm = delta_norm(delta)
        if norm == 0.0:
            return 0.0
        dot = sum(_dot(tensor, self.total[name]) for name, tensor in _floats(delta) if name in self.total)
        if self._total_sq is None:
            self._total_sq = sum(_dot(t, t) for t in self.total.values())
        total_sq = self._total_sq
        along = dot / norm  # the unit direction's projection on the sum, itself included
        others_sq = total_sq - 2 * weight * along + weight * weight
        if others_sq <= 1e-18 * max(total_sq, 1.0):
            return 0.0
        return (along - weight) / others_sq**0.5


def _floats(delta: Mapping[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    return ((name, tensor) for name, tensor in delta.items() if tensor.is_floating_point())


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.flatten().double(), b.flatten().double()))


def disagreement(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> str | None:
    """Why two deltas of the same shard cannot both be honest (None if they agree)."""
    dot = norm_a = norm_b = 0.0
    for name, a in first.items():
        if not a.is_floating_point() or name not in second:
            continue
        x, y = a.double().flatten(), second[name].double().flatten()
        dot += float(x @ y)
        norm_a += float(x @ x)
        norm_b += float(y @ y)
    if norm_a == 0.0 and norm_b == 0.0:
        return None
    cosine = dot / max((norm_a * norm_b) ** 0.5, 1e-300)
    ratio = max(norm_a, norm_b) ** 0.5 / max(min(norm_a, norm_b) ** 0.5, 1e-300)
    if cosine >= REPLICA_COSINE and ratio <= REPLICA_NORM_RATIO:
        return None
    return f"cosine {cosine:.2f}, norm ratio {min(ratio, 1e6):.3g}"


def next_reputation(current: float | None, merged: bool) -> float:
    """A volunteer's reputation after one round: a step toward 1 if merged, toward 0 if rejected."""
    value = START_REPUTATION if current is None else min(1.0, max(0.0, current))
    target = 1.0 if merged else 0.0
    return value + REPUTATION_STEP * (target - value)


def weigh(samples: float, reputation: float | None) -> float:
    """A voice's merge weight: its samples scaled by its volunteer's reputation (floored above 0)."""
    value = START_REPUTATION if reputation is None else reputation
    return samples * max(value, 0.01)
