"""DP-FedAvg: clipped voices, noise on the sum, and epsilon from Google's dp-accounting."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from broker.run_config import RunConfig
from coordinator.errors import PrivacyBudgetSpent, UsageError
from coordinator.merging.privacy import (
    check_round,
    check_settings,
    epsilon_after,
    from_config,
    next_clip,
    privatize,
)
from coordinator.rounds.validation import delta_norm


def independent_epsilon(rounds: int, noise: float, q: float, delta: float) -> float:
    """The same question asked of dp-accounting directly, one round at a time."""
    accountant = RdpAccountant()
    for _ in range(rounds):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("noise", "q"), [(1.0, 1.0), (2.0, 0.25), (0.8, 0.5)])
def test_epsilon_matches_dp_accounting_and_grows_round_over_round(noise, q):
    ours = [epsilon_after(r, noise, q, 1e-5) for r in range(1, 6)]
    theirs = [independent_epsilon(r, noise, q, 1e-5) for r in range(1, 6)]
    assert all(abs(a - b) <= 0.01 * b for a, b in zip(ours, theirs)), (ours, theirs)
    assert all(later > earlier for earlier, later in zip(ours, ours[1:]))
    assert epsilon_after(0, noise, q, 1e-5) == 0.0


def test_each_voice_is_clipped_and_the_sum_is_noised_by_z_times_c():
    big = {"w": torch.full((10_000,), 3.0)}  # norm 300: clipped to 1
    small = {"w": torch.full((10_000,), 0.001)}  # norm 0.1: kept
    mean, count, unclipped = privatize([big, small], clip=1.0, noise=0.0)
    assert count == 2 and unclipped == 1
    expected = (big["w"] / delta_norm(big) + small["w"]) / 2
    assert torch.allclose(mean["w"], expected, atol=1e-6)
    noised, _, _ = privatize([{"w": torch.zeros(200_000)}], clip=2.0, noise=1.5)
    assert float(noised["w"].std()) == pytest.approx(3.0, rel=0.02)  # Z * C, one voice


def test_settings_that_cannot_be_accounted_are_refused():
    check_settings(RunConfig(strategy="median"))  # no DP: anything goes
    with pytest.raises(UsageError, match="both"):
        check_settings(RunConfig(dp_clip=1.0))
    with pytest.raises(UsageError, match="robust strategy"):
        check_settings(RunConfig(dp_clip=1.0, dp_noise=1.0, strategy="trimmed-mean:0.1"))
    with pytest.raises(UsageError, match="smaller than"):
        check_settings(RunConfig(dp_clip=1.0, dp_noise=1.0, dp_population=2, shards=4))
    with pytest.raises(UsageError, match="need --dp-clip"):
        check_settings(RunConfig(dp_quantile=0.5))


def test_the_budget_refuses_the_round_that_would_cross_it():
    two_rounds = epsilon_after(2, 1.0, 1.0, 1e-5)
    config = RunConfig(dp_clip=1.0, dp_noise=1.0, dp_delta=1e-5, shards=4, dp_epsilon=two_rounds * 1.001)
    privacy = from_config(config)
    assert privacy is not None and privacy.sampling_rate == 1.0
    check_round(config, merges=1, shards=4, quorum=4)
    with pytest.raises(PrivacyBudgetSpent, match="dp-epsilon"):
        check_round(config, merges=2, shards=4, quorum=4)


# --- adaptive clipping (Andrew et al. 2021) ---------------------------------------------
def test_adaptive_clipping_pays_for_its_noised_count_in_epsilon():
    fixed = epsilon_after(5, 1.0, 1.0, 1e-5)
    adaptive = epsilon_after(5, 1.0, 1.0, 1e-5, count_noise=2.0)
    accountant = RdpAccountant()
    both = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(1.0), dp_accounting.GaussianDpEvent(2.0)]
    )
    accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, both), 5)
    assert adaptive > fixed
    assert adaptive == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)


def test_the_clip_moves_toward_the_target_quantile():
    config = RunConfig(
        dp_clip=1.0, dp_noise=1.0, dp_quantile=0.5, dp_clip_lr=0.2, dp_count_noise=0.0, shards=4
    )
    privacy = from_config(config)
    assert privacy is not None and privacy.quantile == 0.5
    grown = next_clip(privacy, 1.0, unclipped=0, voices=4)  # every voice was clipped: C too small
    shrunk = next_clip(privacy, 1.0, unclipped=4, voices=4)  # none was: C too large
    assert grown == pytest.approx(math.exp(0.1)) and shrunk == pytest.approx(math.exp(-0.1))
    assert from_config(config.replace(dp_count_noise=None)).count_noise == pytest.approx(4 / 20)


def test_dp_wraps_any_strategy_which_applies_the_clipped_mean_and_keeps_its_state():
    from coordinator.merging.privacy import PrivateStrategy
    from coordinator.merging.strategies import make_strategy

    privacy = from_config(RunConfig(dp_clip=1.0, dp_noise=0.0, shards=2))
    assert privacy is not None
    far, near = {"w": torch.full((4,), 10.0)}, {"w": torch.full((4,), 0.1)}  # norms 20 and 0.2
    wrapped = PrivateStrategy(make_strategy("fedavgm", server_lr=1.0, momentum=0.5), privacy, clip=1.0)
    # samples do not weigh under DP: each voice counts once, the far one clipped to norm 1 (0.5 each)
    first = wrapped.aggregate({"w": torch.zeros(4)}, iter([(100.0, far), (1.0, near)]))
    mean = (0.5 + 0.1) / 2
    # Nesterov momentum of the wrapped strategy: the first step moves by (1 + mu) * mean
    assert torch.allclose(first["w"], torch.full((4,), (1 + 0.5) * mean))
    state = wrapped.state_dict()
    assert state and all(k.startswith("momentum/") for k in state)
    again = PrivateStrategy(make_strategy("fedavgm", server_lr=1.0, momentum=0.5), privacy, clip=1.0)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["momentum/w"], state["momentum/w"])
