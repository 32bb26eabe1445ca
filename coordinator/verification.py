"""Judging each volunteer's delta by what it does to the loss (``init --verify probe``).

Norm limits and robust medians stop loud attacks; a quiet one passes them: the
honest direction reversed at an ordinary norm, training on junk, or a
near-zero delta that collects credit. So the aggregator applies each voice
(a volunteer's combined deltas of the round) alone to the round's base model
and measures its *gain*: how much it lowers the loss on a small fixed probe
set (the job's ``probe_batches()``, else its evaluation). A voice is judged only
against the round's other voices, so the bar follows the run as gains shrink
late in training, and it is probed at its share of the merge (``1/n`` of a
full step), where its direction counts rather than the curvature of a whole
step. A voice is rejected when its gain is both under ``USEFUL_FRACTION`` of
the others' median and more than ``SPREAD`` robust deviations below it (so
honest volunteers on different data, whose gains differ, are not), or when
its delta is under ``NORM_FLOOR`` of the others' median norm (a free-rider's
near-zero upload). Nothing is judged while the others gain nothing.

Each volunteer's reputation, in [0, 1] from 0.5, moves toward 1 with every
merged voice and toward 0 with every rejected one; the merge weighs voices by
it, so a volunteer that was caught before counts less even when it is not.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping

import torch

from jobs.interface import Job
from serialization import TensorDict

# A voice gaining less than this fraction of the others' median gain, and more than SPREAD
# robust standard deviations (1.4826 MAD) below it, is rejected.
USEFUL_FRACTION = 0.1
SPREAD = 3.0
# A voice whose delta norm is under this fraction of the others' median norm is rejected.
NORM_FLOOR = 0.05
START_REPUTATION = 0.5
# How far one round moves a reputation toward 1 (merged) or 0 (rejected).
REPUTATION_STEP = 0.2
VERIFY_MODES = ("probe", "none")
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
        self.base_loss = probe_loss(job, self.model)

    def gain(self, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> float:
        """How much ``scale * delta`` added to the base lowers the probe loss (negative: raises it).

        The merge moves the model by about ``1/n`` of each of ``n`` voices, so
        that is the step to probe with: a voice's share, where its first-order
        effect (its direction) dominates the curvature of a full step.
        """
        with torch.no_grad():
            moved = {
                name: tensor + scale * delta[name].to(tensor.dtype) if name in delta else tensor
                for name, tensor in self.base.items()
            }
        self.model.load_state_dict(moved)
        return self.base_loss - probe_loss(self.job, self.model)


def judge(gains: Mapping[str, float], norms: Mapping[str, float] | None = None) -> dict[str, str]:
    """The voices to reject, with a reason containing ``probe``; the others are kept.

    Each voice is measured against the *other* voices, so one bad voice cannot
    shift its own bar; a round of one voice, or one whose others gain nothing,
    rejects none.
    """
    reasons = {}
    for name, gain in gains.items():
        others = [g for other, g in gains.items() if other != name]
        if not others:
            continue
        typical = statistics.median(others)
        if typical <= 0:
            continue
        deviation = 1.4826 * statistics.median(abs(g - typical) for g in others)
        if norms is not None:
            usual = statistics.median(n for other, n in norms.items() if other != name)
            if norms[name] < NORM_FLOOR * usual:
                reasons[name] = (
                    f"probe: a delta of norm {norms[name]:.3g}, under {NORM_FLOOR:.0%} "
                    f"of the round's others ({usual:.3g}): too small to be of use"
                )
                continue
        if gain >= USEFUL_FRACTION * typical or gain >= typical - SPREAD * deviation:
            continue
        if gain < 0:
            reasons[name] = (
                f"probe: raises the probe loss by {-gain:.3g} "
                f"while the round's others lower it by {typical:.3g}"
            )
        else:
            reasons[name] = (
                f"probe: lowers the probe loss by {gain:.3g}, under {USEFUL_FRACTION:.0%} "
                f"of the round's others ({typical:.3g})"
            )
    return reasons


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


def gains_of(prober: Prober, voices: Iterable[tuple[str, TensorDict]]) -> dict[str, float]:
    """Each voice's gain, one voice in memory at a time."""
    return {name: prober.gain(delta) for name, delta in voices}
