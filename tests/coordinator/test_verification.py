"""Probe scoring: the rule that judges a voice against the round's others, and reputation."""

from __future__ import annotations

import pytest
import torch

from coordinator.verification import (
    START_REPUTATION,
    Prober,
    disagreement,
    judge,
    next_reputation,
    probe_loss,
    weigh,
)
from jobs import load_job
from tests.fixtures.jobs_tiny import TinyJob


def test_a_voice_that_raises_the_loss_while_the_others_lower_it_is_rejected():
    reasons = judge({"alice": 0.30, "bob": 0.25, "mallory": -0.28})
    assert set(reasons) == {"mallory"} and "probe" in reasons["mallory"]
    assert "raises the probe loss" in reasons["mallory"]


def test_a_near_zero_voice_is_far_less_useful_and_rejected():
    reasons = judge({"alice": 0.30, "bob": 0.25, "freeloader": 0.001})
    assert set(reasons) == {"freeloader"} and "probe" in reasons["freeloader"]


def test_honest_voices_of_different_usefulness_are_all_kept():
    assert judge({"a": 0.30, "b": 0.12, "c": 0.05, "d": 0.41}) == {}


def test_nothing_is_judged_alone_or_when_the_others_gain_nothing():
    assert judge({"alone": -1.0}) == {}
    assert judge({"a": -0.01, "b": -0.02, "c": 0.0}) == {}


def test_reputation_starts_in_the_middle_and_moves_toward_what_happened():
    up = next_reputation(None, merged=True)
    down = next_reputation(None, merged=False)
    assert down < START_REPUTATION < up
    value = None
    for _ in range(50):
        value = next_reputation(value, merged=False)
    assert 0.0 <= value < 0.01
    assert next_reputation(7.0, merged=True) <= 1.0  # a corrupt record is clamped
    assert weigh(10, 0.0) > 0 and weigh(10, 1.0) == 10


def test_the_prober_sees_a_step_toward_the_optimum_as_a_gain_and_the_reverse_as_a_loss():
    job = TinyJob()
    base = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    toward = {"weight": 0.2 * (job.true_w.T - base["weight"]), "bias": -0.2 * base["bias"]}
    prober = Prober(job, base)
    assert prober.gain(toward) > 0
    assert prober.gain({k: -v for k, v in toward.items()}) < 0
    assert prober.gain({}) == pytest.approx(0.0)


def test_charlm_probes_on_fixed_held_out_batches_apart_from_its_eval():
    job = load_job("charlm", {"layers": 1, "width": 16, "heads": 2, "context": 16, "max_files": 4})
    first, again = job.probe_batches(), job.probe_batches()
    assert len(first) >= 1 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], job._eval_windows()[0][0])
    model = job.build_model()
    assert probe_loss(job, model) > 0 and model.training


def test_a_free_riders_tiny_delta_is_rejected_by_its_norm_whatever_its_gain():
    gains = {"alice": 0.30, "bob": 0.10, "carol": -0.05, "freeloader": 0.0}
    norms = {"alice": 1.0, "bob": 1.2, "carol": 0.9, "freeloader": 0.001}
    reasons = judge(gains, norms)
    assert set(reasons) == {"freeloader"} and "probe" in reasons["freeloader"]
    assert "too small" in reasons["freeloader"]


def test_two_trainings_of_a_shard_agree_up_to_floating_point_noise_and_not_beyond():
    gen = torch.Generator().manual_seed(0)
    honest = {"w": torch.randn(64, 8, generator=gen), "b": torch.randn(8, generator=gen)}
    noisy = {k: v * (1 + 1e-3 * torch.randn(v.shape, generator=gen)) for k, v in honest.items()}
    assert disagreement(honest, noisy) is None
    other = {k: torch.randn(v.shape, generator=gen) for k, v in honest.items()}
    assert "cosine" in (disagreement(honest, other) or "")
    assert "norm ratio" in (disagreement(honest, {k: 3 * v for k, v in honest.items()}) or "")
