"""The merge's defences against Sybils and boosted voices (``coordinator.merging.sybils``): pure functions."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.merging import sybils


def test_probation_ramps_from_a_ninth_to_full_weight():
    assert sybils.probation(0) == pytest.approx(1 / 9)
    assert sybils.probation(4) == pytest.approx(5 / 9)
    assert sybils.probation(sybils.PROBATION_SHARDS) == 1.0 == sybils.probation(1000)
    assert sybils.probation(-5) == pytest.approx(1 / 9)


def test_a_voice_longer_than_the_median_is_clipped_to_it():
    bound = sybils.clip_bound([1.0, 2.0, 10.0], history=[50.0])
    assert bound == 2.0  # three voices: the round's median, not the history
    assert sybils.clip_scale(10.0, bound) == pytest.approx(0.2)
    assert sybils.clip_scale(1.5, bound) == 1.0
    assert (
        sybils.clip_bound([1.0, 2.0, 10.0, 10.0], history=[]) == 2.0
    )  # the lower median: two boosted of four
    # fewer than three voices: twice the median of recently merged voices; none before any
    assert sybils.clip_bound([1.0, 9.0], history=[3.0, 4.0, 100.0]) == 2 * 4.0
    assert sybils.clip_bound([1.0, 9.0], history=[]) is None
    assert sybils.clip_scale(9.0, None) == 1.0
    assert sybils.clip_bound([math.nan, 0.0, 1.0, 2.0, 3.0], history=[]) == 2.0


def _round(
    dim: int, seed: int, honest: int, sybils_: int, noise: float = 0.1, draw: int = 0
) -> dict[str, torch.Tensor]:
    """Honest voices around one direction (every one alike, as on a tiny model), Sybils around another;
    ``draw`` picks the voices' noise."""
    gen = torch.Generator().manual_seed(seed)
    common, harmful = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    gen.manual_seed(seed + 1000 * (draw + 1))
    out = {
        f"h{i}": common + noise * common.norm() / dim**0.5 * torch.randn(dim, generator=gen)
        for i in range(honest)
    }
    for i in range(sybils_):
        out[f"s{i}"] = (
            -common + 2 * harmful + 0.02 * harmful.norm() / dim**0.5 * torch.randn(dim, generator=gen)
        )
    return {name: sybils.fold(v) for name, v in out.items()}


@pytest.mark.parametrize("dim", [17, 20_000])
def test_sybils_pushing_one_direction_share_a_voice_and_honest_voices_stay_apart(dim):
    accumulated: dict[str, torch.Tensor] = {}
    for draw in range(5):
        for name, voice in _round(dim, 1, 3, 2, draw=draw).items():  # the same directions, new noise
            accumulated[name] = sybils.accumulate(accumulated.get(name), voice)
    grouped = sybils.groups(accumulated)
    assert grouped == {"s0": "s0", "s1": "s0"}
    weights = sybils.shares({"h0": 1.0, "h1": 1.0, "h2": 1.0, "s0": 1.0, "s1": 1.0}, grouped)
    assert weights == {"h0": 1.0, "h1": 1.0, "h2": 1.0, "s0": 0.5, "s1": 0.5}


@pytest.mark.parametrize("dim", [17, 5_000])
def test_honest_voices_alike_as_on_a_tiny_model_are_not_grouped(dim):
    for seed in range(20):
        assert sybils.groups(_round(dim, seed, 4, 0, noise=0.05)) == {}, seed


def test_no_groups_without_a_third_voice_or_between_sketches_of_different_sizes():
    two = _round(17, 0, 0, 2)
    assert sybils.groups(two) == {}
    mixed = {**_round(17, 0, 1, 2), "odd": torch.ones(5)}
    assert "odd" not in sybils.groups(mixed)


def test_fold_keeps_cosines_and_is_unit():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300_000, generator=gen)
    b = a + 0.5 * torch.randn(300_000, generator=gen)
    exact = float(torch.dot(a, b) / (a.norm() * b.norm()))
    fa, fb = sybils.fold(a), sybils.fold(b)
    assert fa.numel() == sybils.SKETCH and float(fa.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(torch.dot(fa, fb)) == pytest.approx(exact, abs=0.05)
    assert torch.equal(sybils.fold(torch.zeros(5)), torch.zeros(5))


def test_stored_directions_decode_only_when_well_formed():
    vector = torch.arange(6, dtype=torch.float32)
    assert torch.equal(sybils.decode(sybils.encode(vector)), vector)
    for junk in (None, b"", b"abc", b"\0" * (4 * sybils.SKETCH + 4), sybils.encode(torch.tensor([math.inf]))):
        assert sybils.decode(junk) is None


def _spread(seed: int, count: int, share: float = 1.0, dim: int = 512) -> list[torch.Tensor]:
    """``count`` honest voices: one common direction plus each one's noise (cosines ~0.5), and a
    last voice with ``share`` of that direction (a backdoor trained on data of its own: less)."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=gen, dtype=torch.float64)
    noise = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(count + 1)]
    return [common + n for n in noise[:-1]] + [share * common + noise[-1]]


@pytest.mark.parametrize("honest", [2, 4, 7])
def test_a_voice_trained_on_other_data_is_the_outlier_left_out(honest):
    *good, bad = _spread(honest, honest, share=0.5)
    voices = {**{f"h{i}": v for i, v in enumerate(good)}, "mallory": bad}
    dropped = sybils.outliers(voices)
    assert "mallory" in dropped
    # never more than the minority: the round's densest majority always merges
    assert len(dropped) <= (honest + 1) - ((honest + 1) // 2 + 1)
    plan = sybils.Plan({"h0": 0.5}, None, outliers=dropped)
    assert plan.weight("mallory", 3.0) == 0.0
    assert plan.weight("h0", 3.0) == (0.0 if "h0" in dropped else 1.5)


def test_no_outliers_under_three_voices_or_without_a_direction():
    two = dict(zip(("a", "b"), _spread(1, 2)[:2], strict=True))
    assert sybils.outliers(two) == set()
    # a zero voice is compared with no one, so two voices with a direction remain: none left out
    assert sybils.outliers({**two, "zero": torch.zeros(512)}) == set()
    assert sybils.outliers({**two, "small": torch.ones(7)}) == set()  # another sketch size
    three = dict(zip(("a", "b", "c"), _spread(2, 3)[:3], strict=True))
    assert len(sybils.outliers(three)) == 1  # three alike honest voices: one is still left out
