"""Judging each volunteer's delta by what it does to the loss (``init --verify probe``).

Norm limits and robust medians stop loud attacks; a quiet one passes them: the
honest direction reversed at an ordinary norm, training on junk, or a
near-zero delta that collects credit. So the aggregator weighs two pieces of
evidence about each voice (a volunteer's combined deltas of the round):

* its *gain*: how much it lowers the loss on a small fixed probe set (the job's
  ``probe_batches()``, else its evaluation) when applied alone to the round's
  base model at its share of the merge (``1/n`` of a full step);
* its *agreement*: the cosine between its direction and the round's other
  voices' directions, summed with their volunteers' reputations as weights.

Late in training a probe of a few batches is mostly noise: an honest voice
trained on other files may raise it a little while the others lower it
(5.8% of honest voices were rejected on the probe alone, bench/probe_scoring.py).
Honest voices still point the way the others do (cosine 0.1 to 0.9 measured),
while a reversed delta, an ascender or a junk trainer points away (below 0).
So a voice is rejected when (``judge``):

* its delta is under ``NORM_FLOOR`` of the others' median norm (a free-rider), or
* it points against the others (agreement under ``OPPOSED``) and gains less on
  the probe than their median, or
* it barely follows them (agreement under ``AGREEMENT``) and the probe finds it
  far worse than them: under ``USEFUL_FRACTION`` of their median gain and more
  than ``SPREAD`` robust deviations below it.

A voice that follows the round's direction is not rejected by the probe; its
harm is bounded by that agreement and by the norm screen. Every rule needs
honest voices to carry most of the round's reputation.

Near convergence honest steps are mostly noise, and their gains differ by
about the round's gain or by what any step of their length costs on the probe
(the probe's *resolution*, ``Prober.cost``: half the loss a step and its
opposite add together). So a rule's verdict stands only when the shortfall
under the others' median gain exceeds the probe's noise band: ``NOISE`` x the
others' resolution and, for harm, the shortfall of an honest voice whose data
differ from the others' (``_honest_shortfall``), less as the voice turns from
them (``judge``). Such a voice is not probe noise: gpt nano's shard of other
files raised the loss on 64 held-out batches as much as on the 8 probe batches
(docs/BENCHMARKS.md), so the band is measured from the round's other voices,
not from the probe's sampling error. A round of one voice is judged too: it
must not raise the probe loss by more than ``NOISE`` x the resolution of the
run's last update at the usual norm (``lone_resolution``). Voices that copy
another's direction or the last published update are refused (``copies``).

Each volunteer's reputation, in [0, 1] from 0.5, moves toward 1 with every
merged voice and toward 0 with every rejected one; the merge weighs voices by
it, so a volunteer that was caught before counts less even when it is not.
"""

from __future__ import annotations

import math
import secrets
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from coordinator.rounds.validation import delta_norm
from jobs.interface import Job
from serialization import TensorDict

# A voice gaining less than this fraction of the others' median gain, and more than SPREAD
# robust standard deviations (1.4826 MAD) below it, is far worse than them.
USEFUL_FRACTION = 0.1
SPREAD = 3.0
# A voice whose delta norm is under this fraction of the others' median norm is rejected.
NORM_FLOOR = 0.05
# Cosines with the others' reputation-weighted directions: under OPPOSED a voice points
# against them; under AGREEMENT it does not clearly follow them (honest: 0.1 to 0.9).
OPPOSED = 0.0
AGREEMENT = 0.1
# The probe's noise band: a voice found worse than the round's others by a rule is rejected
# only when its shortfall under their median gain exceeds the larger of NOISE x the probe's
# resolution (what a step of the usual length in the usual directions costs whatever its sign,
# ``Prober.cost``) and, when the rule is about harm (it points against them, or it raises the
# loss), the shortfall of an honest voice on other data (``_honest_shortfall``: NOISE_GAIN x
# their median gain, or that gain plus the resolution plus SPREAD deviations of their gains);
# both x (1 - how far its cosine with them falls under theirs). Honest voices near
# convergence differ by about the round's gain or resolution and follow the others about as
# well as they do (near 0 on a sparse model); a voice that reverses an honest one falls
# 2 x (gain + resolution) below, its cosine as far under theirs as theirs is above 0, and
# junk turns away from them.
# A lone voice is rejected when it raises the probe loss by more than NOISE x the resolution.
NOISE = 4.0
NOISE_GAIN = 3.0
# The resolution is the median probe cost of at most this many of the round's other judged
# voices, drawn with ``secrets`` when the round is judged: a cost is one more probe pass, and
# a median of 8 costs at the usual norm is what the band needs, whatever the round's size.
# More costs would double a large round's probe passes (each judged voice probed twice) and
# narrow the band's estimate by little.
RESOLUTION_PEERS = 8
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
    """Measures voices' gains against one base model, with one model instance for all of them."""

    def __init__(self, job: Job, base: TensorDict) -> None:
        self.job = job
        self.base = base
        self.model = job.build_model()
        self.model.load_state_dict(base)
        self._live = self.model.state_dict()  # the model's own tensors: a probe moves them in place
        self.base_loss = probe_loss(job, self.model)

    def gain(self, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> float:
        """How much ``scale * delta`` added to the base lowers the probe loss (negative: raises it).

        The merge moves the model by about ``1/n`` of each of ``n`` voices, so
        that is the step to probe with: a voice's share, where its first-order
        effect (its direction) dominates the curvature of a full step.
        """
        with (
            torch.no_grad()
        ):  # in place: a model's worth of allocation and load_state_dict was 15% of a probe
            for name, tensor in self._live.items():
                tensor.copy_(self.base[name])
                if name in delta:
                    if delta[name].shape != tensor.shape:  # add_ would broadcast it
                        raise ValueError(f"{name}: a delta of shape {tuple(delta[name].shape)}")
                    tensor.add_(delta[name].to(tensor.dtype), alpha=scale)
        return self.base_loss - probe_loss(self.job, self.model)

    def cost(self, delta: Mapping[str, torch.Tensor], scale: float, gain: float) -> float:
        """The probe's resolution for this step: what it costs whatever its direction.

        Half the loss a step and its opposite add together (``gain`` is the
        step's own): the curvature term, which any direction of that length
        pays. Gains that differ by less than it are within the probe's noise,
        as near convergence, where honest steps are mostly noise.
        """
        return max(0.0, -(gain + self.gain(delta, -scale)) / 2)


@dataclass(frozen=True)
class Evidence:
    """What the aggregator measured of one voice: probe gain, delta norm, agreement with the others."""

    gain: float
    norm: float = 1.0
    agreement: float = 0.0


# (voice) -> the probe's resolution for its step (``Prober.cost``), measured only when asked
Cost = Callable[[str], float]


def judge(
    evidence: Mapping[str, Evidence], cost: Cost | None = None, lone_resolution: float | None = None
) -> dict[str, str]:
    """The voices to reject, with a reason containing ``probe``; the others are kept.

    Each voice is measured against the *other* voices, so one bad voice cannot
    shift its own bar. A rule that finds a voice worse than the others rejects
    it only if its shortfall exceeds the probe's noise band: ``NOISE`` x the
    probe's resolution, the median ``cost`` of the others' steps (each at their
    median norm; in a large round, of ``RESOLUTION_PEERS`` of them drawn from
    those no rule doubts: ``_resolution_pool``), what a step of the round's usual length and kind costs on
    the probe whatever its direction (not the voice's own: a step in a sharp
    direction, an ascender's, costs far more and would widen its own band);
    for harm, ``_honest_shortfall`` if larger; the band
    narrows as the voice's agreement falls under theirs. A lone voice is
    rejected when it raises the probe loss by more than ``NOISE`` x
    ``lone_resolution``.
    """
    reasons: dict[str, str] = {}
    if len(evidence) == 1:
        ((name, seen),) = evidence.items()
        if lone_resolution is not None and -seen.gain > NOISE * lone_resolution:
            reasons[name] = (
                f"probe: a lone voice that raises the probe loss by {-seen.gain:.3g}, "
                f"beyond the probe's noise ({NOISE * lone_resolution:.3g})"
            )
        return reasons
    for name, seen in evidence.items():
        usual = [e.norm for other, e in evidence.items() if other != name]
        if usual and seen.norm < NORM_FLOOR * statistics.median(usual):
            reasons[name] = (
                f"probe: a delta of norm {seen.norm:.3g}, under {NORM_FLOOR:.0%} "
                f"of the round's others ({statistics.median(usual):.3g}): too small to be of use"
            )
    # The voices past the norm screen: each is judged against all the others, whatever the
    # verdicts on them, so the order of judging changes no bar.
    screened = [name for name in evidence if name not in reasons]
    doubted = {name: found for name in screened if (found := _rule(name, screened, evidence))}
    pool = _resolution_pool(screened, doubted)
    costs: dict[str, float] = {}
    for name, (reason, harm, typical, deviation) in doubted.items():
        seen = evidence[name]
        peers = [other for other in screened if other != name]
        # the probe's noise band (module docstring), narrowed as the voice turns from the others:
        # by how far its cosine with them falls under their own
        gap = statistics.median(evidence[other].agreement for other in peers) - seen.agreement

        within = partial(
            _within,
            shortfall=typical - seen.gain,
            narrowed=min(1.0, max(0.0, 1.0 - gap)),
            honest=partial(_honest_shortfall, typical, deviation=deviation) if harm else None,
        )
        if cost is None:
            kept = within(0.0)
        else:
            usual_norm = statistics.median(evidence[other].norm for other in peers)
            measured = [other for other in pool if other != name][:RESOLUTION_PEERS]
            kept = _settled(within, measured, costs, partial(_usual_cost, cost, evidence, usual_norm))
        if kept:
            continue  # within the probe's noise: near convergence, honest steps are mostly noise
        reasons[name] = reason
    return reasons


def _within(
    resolution: float, shortfall: float, narrowed: float, honest: Callable[[float], float] | None
) -> bool:
    """Whether the probe's noise band at ``resolution``, ``narrowed``, holds a voice's ``shortfall``.

    The band is ``NOISE`` x the resolution or, for harm, ``honest(resolution)``
    if larger (``_honest_shortfall``); it never shrinks as the resolution grows.
    """
    if narrowed == 0.0:  # no band left (and no infinite resolution times 0)
        return shortfall <= 0.0
    band = NOISE * resolution
    if honest is not None:
        band = max(band, honest(resolution))
    return shortfall <= band * narrowed


def _usual_cost(cost: Cost, evidence: Mapping[str, Evidence], usual_norm: float, name: str) -> float:
    """A voice's probe cost at the round's usual norm (``_scaled``)."""
    return _scaled(cost(name), evidence[name].norm, usual_norm)


def _settled(
    within: Callable[[float], bool],
    measured: list[str],
    costs: dict[str, float],
    cost: Callable[[str], float],
) -> bool:
    """``within(median of the measured voices' costs)``, probing only as many as the verdict needs.

    The band grows with the resolution and a median with each of its values, so
    the costs still unknown bound it: all of them 0 from below, all infinite from
    above. Once both bounds give one verdict it is the verdict of every cost
    measured (a voice far outside the band is rejected after five probes of
    eight). ``costs`` keeps what was measured for the round's other voices.
    """
    for other in measured:
        known = [costs[o] for o in measured if o in costs]
        unknown = len(measured) - len(known)
        low = within(statistics.median(known + [0.0] * unknown))
        if low == within(statistics.median(known + [math.inf] * unknown)):
            return low
        if other not in costs:
            costs[other] = max(0.0, cost(other))  # a cost is never negative (``Prober.cost``)
    return within(statistics.median(costs[other] for other in measured)) if measured else within(0.0)


def _rule(
    name: str, screened: list[str], evidence: Mapping[str, Evidence]
) -> tuple[str, bool, float, float] | None:
    """The rule that finds ``name`` worse than the round's other screened voices, if one does.

    (reason, whether the rule is about harm, the others' median gain, their robust deviation).
    """
    seen = evidence[name]
    others = [evidence[other].gain for other in screened if other != name]
    if not others:
        return None
    typical = statistics.median(others)
    deviation = 1.4826 * statistics.median(abs(g - typical) for g in others)
    if seen.agreement < OPPOSED and seen.gain < typical:
        reason = (
            f"probe: points against the round's other deltas (cosine {seen.agreement:.2f}) "
            f"and lowers the probe loss less than they do ({seen.gain:.3g} against {typical:.3g})"
        )
        return reason, True, typical, deviation
    if seen.agreement < AGREEMENT and _far_worse(seen.gain, typical, deviation):
        harm = seen.gain < 0
        reason = (
            f"probe: raises the probe loss by {-seen.gain:.3g} while the round's others change it "
            f"by {-typical:.3g}"
            if harm
            else f"probe: lowers the probe loss by {seen.gain:.3g}, under {USEFUL_FRACTION:.0%} "
            f"of the round's others ({typical:.3g})"
        )
        return reason, harm, typical, deviation
    return None


def _resolution_pool(screened: list[str], doubted: Mapping[str, object]) -> list[str]:
    """The voices whose probe cost measures the resolution: every screened one in a small round.

    In a round of more than ``RESOLUTION_PEERS`` + 1 screened voices, ``RESOLUTION_PEERS`` + 1
    drawn with ``secrets`` from those no rule doubts (from all screened ones if too few are
    left): each cost is one more probe pass, and a doubted voice's step (an ascender's is
    sharp, so costly) must not widen the band it is judged by.
    """
    if len(screened) <= RESOLUTION_PEERS + 1:
        return screened
    trusted = [name for name in screened if name not in doubted]
    source = trusted if len(trusted) > RESOLUTION_PEERS else screened
    return sorted(_RANDOM.sample(source, RESOLUTION_PEERS + 1))


def _honest_shortfall(typical: float, resolution: float, deviation: float) -> float:
    """How far under the others' median gain an honest voice may fall on the probe.

    ``NOISE_GAIN`` x their gain, or, if larger, what the probe measures of an
    honest voice whose data differ from the others': its direction misses
    theirs (it gains none of ``typical`` and pays its step's curvature, the
    ``resolution``), and honest voices differ by ``SPREAD`` robust deviations
    of the others' gains on top. Every term is measured in the round.
    """
    gain = max(typical, 0.0)
    return max(NOISE_GAIN * gain, gain + resolution + SPREAD * deviation)


def _scaled(cost: float, norm: float, usual: float | None) -> float:
    """A step's probe cost at the usual norm instead of its own (the cost grows as the square)."""
    if usual is None or usual <= 0 or norm <= 0:
        return cost
    return cost * (usual / norm) ** 2


def _far_worse(gain: float, typical: float, deviation: float) -> bool:
    """Under a tenth of the others' median gain (when they gain) and SPREAD deviations below it."""
    if typical > 0 and gain >= USEFUL_FRACTION * typical:
        return False
    return gain < typical - SPREAD * deviation


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
    return _scaled(prober.cost(delta, 1.0, gain), delta_norm(delta), usual_norm)


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


def _sketch_hashes(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The count sketch's bucket and sign of values ``start`` to ``start + count`` of a delta."""
    index = torch.arange(start, start + count, dtype=torch.int64)
    hashed = (index * 48271 + 11) % 2147483647
    hashed = (hashed * 48271) % 2147483647
    return hashed % SKETCH, ((hashed // SKETCH) % 2).to(torch.int8) * 2 - 1


def _sketch_layout(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sketch_hashes`` of a whole delta of ``total`` values, made once per size and kept."""
    if _LAYOUT.get("total") != total:
        buckets, signs = _sketch_hashes(0, total)
        _LAYOUT.update(total=total, buckets=buckets.int(), signs=signs)
    return _LAYOUT["buckets"], _LAYOUT["signs"]


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
