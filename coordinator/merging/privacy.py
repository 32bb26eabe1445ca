"""DP-FedAvg (McMahan et al. 2018): clip each volunteer's voice, noise the sum, account for ε.

The aggregator (trusted: it sees individual deltas) clips every volunteer's
combined delta of the round to L2 norm ``clip``, sums the clipped voices, adds
Gaussian noise of standard deviation ``noise * clip`` to the sum and divides by
the number of voices; the strategy then applies that mean like any other. One
volunteer changes the sum by at most ``clip``, so each merge is the Gaussian
mechanism with noise multiplier ``noise``. ε after r merges is what Google's
``dp-accounting`` RDP accountant gives for r compositions of the
Poisson-subsampled Gaussian mechanism at sampling rate q (quorum / population,
1 without a population) and δ. No privacy maths is written here.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from broker.run_config import DEFAULT_DP_CLIP_LR, DEFAULT_DP_DELTA, RunConfig
from coordinator.errors import PrivacyBudgetSpent, UsageError
from coordinator.merging.strategies import Strategy, WeightedDelta
from coordinator.rounds.posting import parse_quorum
from coordinator.rounds.validation import delta_norm
from serialization import TensorDict


@dataclass(frozen=True)
class Privacy:
    """A run's DP settings (``init --dp-*``)."""

    clip: float
    noise: float
    delta: float = DEFAULT_DP_DELTA
    budget: float | None = None  # --dp-epsilon: no round may take epsilon above it
    population: int | None = None  # --dp-population: volunteers a round samples from
    quorum: int = 1  # accepted shards a round needs (init's --quorum): q = quorum / population
    quantile: float | None = None  # --dp-quantile: adaptive clipping's target (None: fixed C)
    clip_lr: float = DEFAULT_DP_CLIP_LR  # --dp-clip-lr: how fast C follows that quantile
    count_noise: float = 0.0  # --dp-count-noise: std of the noise on the count of unclipped voices

    @property
    def sampling_rate(self) -> float:
        """q of the accountant: the fraction of the population whose voices one round takes."""
        return 1.0 if not self.population else min(1.0, self.quorum / self.population)

    def epsilon(self, merges: int) -> float:
        """ε after ``merges`` merged rounds, at this run's δ (0 before the first)."""
        count = self.count_noise if self.quantile is not None else None
        return epsilon_after(merges, self.noise, self.sampling_rate, self.delta, count)


def epsilon_after(
    rounds: int, noise: float, q: float, delta: float, count_noise: float | None = None
) -> float:
    """ε of ``rounds`` Poisson-subsampled Gaussian mechanisms (noise multiplier, rate q) at δ.

    With adaptive clipping each round also releases the noised count of unclipped
    voices (sensitivity 1, noise std ``count_noise``): a second Gaussian mechanism,
    composed in by the accountant (its extra privacy cost).
    """
    if rounds <= 0:
        return 0.0
    if noise <= 0 or (count_noise is not None and count_noise <= 0):
        return math.inf  # a release without noise protects nobody
    # imported here: dp_accounting brings scipy (0.7 s), which no command without DP needs
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    mechanisms = [dp_accounting.GaussianDpEvent(noise)]
    if count_noise is not None:
        mechanisms.append(dp_accounting.GaussianDpEvent(count_noise))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent(mechanisms))
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def next_clip(privacy: Privacy, clip: float, unclipped: int, voices: int) -> float:
    """Adaptive clipping (Andrew et al. 2021): move C geometrically toward the target quantile.

    The fraction of voices that were not clipped is released with Gaussian noise
    (accounted in ``epsilon``); C shrinks when more than the target fraction fit under it.
    """
    if privacy.quantile is None or voices == 0:
        return clip
    noise = torch.randn((), generator=torch.Generator().manual_seed(secrets.randbits(63)))
    fraction = (unclipped + privacy.count_noise * float(noise)) / voices
    return clip * math.exp(-privacy.clip_lr * (fraction - privacy.quantile))


def from_config(config: RunConfig) -> Privacy | None:
    """The run's DP settings, or None for a run without differential privacy."""
    if config.dp_clip is None or config.dp_noise is None:
        return None
    quorum = parse_quorum(config.quorum, config.shards)
    return Privacy(
        quorum=quorum,
        clip=config.dp_clip,
        noise=config.dp_noise,
        delta=config.dp_delta,
        budget=config.dp_epsilon,
        population=config.dp_population,
        quantile=config.dp_quantile,
        clip_lr=DEFAULT_DP_CLIP_LR if config.dp_clip_lr is None else config.dp_clip_lr,
        # --dp-count-noise, else the paper's choice: the expected voices of a round over 20
        count_noise=quorum / 20 if config.dp_count_noise is None else config.dp_count_noise,
    )


def check_settings(config: RunConfig) -> None:
    """Refuse DP settings that cannot work, or a strategy the accountant does not cover (UsageError)."""
    clip, noise, strategy = config.dp_clip, config.dp_noise, config.strategy
    population, shards = config.dp_population, config.shards
    if clip is None and noise is None:
        if any(v is not None for v in (config.dp_quantile, config.dp_clip_lr, config.dp_count_noise)):
            raise UsageError("--dp-quantile, --dp-clip-lr and --dp-count-noise need --dp-clip and --dp-noise")
        return
    if clip is None or noise is None:
        raise UsageError("differential privacy needs both --dp-clip C and --dp-noise Z")
    if strategy.split(":")[0] in ("median", "trimmed-mean", "krum"):
        raise UsageError(
            f"--strategy {strategy} with differential privacy: a robust strategy picks among the "
            "clipped deltas, which the accountant's Gaussian sum does not cover; use fedavg, "
            "fedavgm, diloco or fedadam (clipping already bounds every volunteer's influence)"
        )
    if population is not None and population < 1:
        raise UsageError("--dp-population must be at least 1")
    if population is not None and population < shards:
        raise UsageError(f"--dp-population {population} is smaller than a round's {shards} shards")


def privatize(
    voices: Iterable[Mapping[str, torch.Tensor]], clip: float, noise: float
) -> tuple[TensorDict, int, int]:
    """(mean of the clipped voices plus noise of std noise*clip on their sum, voices, voices not clipped)."""
    total: TensorDict = {}
    count = unclipped = 0
    for voice in voices:
        norm = delta_norm(voice)
        unclipped += norm <= clip
        scale = 1.0 if norm <= clip else clip / norm
        for name, tensor in voice.items():
            if name in total:
                total[name].add_(tensor, alpha=scale)
            else:
                total[name] = tensor.to(torch.float32) * scale
        count += 1
    if count == 0:
        return total, 0, 0
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    for tensor in total.values():
        tensor.add_(torch.randn(tensor.shape, generator=generator), alpha=noise * clip)
        tensor.div_(count)
    return total, count, unclipped


class PrivateStrategy(Strategy):
    """DP-FedAvg around any streaming strategy: the strategy sees one voice, the noised mean.

    Each voice is clipped to C (``clip``, this round's), the clipped voices are
    summed with Gaussian noise of std ``noise * C`` and divided by their count;
    the wrapped strategy (its server lr, momentum or moments) applies that mean
    as it would any round's. With adaptive clipping, ``next_clip`` is the next
    round's C once ``aggregate`` ran.
    """

    def __init__(self, inner: Strategy, privacy: Privacy, clip: float) -> None:
        super().__init__()
        self.inner, self.privacy, self.clip = inner, privacy, clip
        self.name = f"dp({inner.name})"
        self.next_clip: float | None = None

    def aggregate(
        self, weights: TensorDict, deltas: Iterable[WeightedDelta], *, copy: bool = False
    ) -> TensorDict:
        mean, count, unclipped = privatize((delta for _, delta in deltas), self.clip, self.privacy.noise)
        if self.privacy.quantile is not None:
            self.next_clip = next_clip(self.privacy, self.clip, unclipped, count)
        return self.inner.aggregate(weights, iter([(1.0, mean)] if count else []), copy=copy)

    def state_dict(self) -> TensorDict:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


def spent(privacy: Privacy | None, merges: int) -> float | None:
    """ε so far for the JSON and status (None for a run without DP)."""
    if privacy is None:
        return None
    value = privacy.epsilon(merges)
    return round(value, 6) if math.isfinite(value) else None


def check_round(config: RunConfig, merges: int, shards: int, quorum: int) -> None:
    """Refuse a round the budget cannot pay for, or one the accountant's q would not describe."""
    privacy = from_config(config)
    if privacy is None:
        return
    if privacy.population and (quorum != privacy.quorum or shards != config.shards):
        raise UsageError(
            f"this run is accounted with q = quorum/population = {privacy.quorum}/{privacy.population}: "
            "its rounds keep the --shards and --quorum given to init"
        )
    if privacy.budget is None:
        return
    now, after = privacy.epsilon(merges), privacy.epsilon(merges + 1)  # inf without noise
    if after > privacy.budget:
        raise PrivacyBudgetSpent(
            f"privacy budget: one more round would take epsilon from {now:.4g} to {after:.4g}, "
            f"over --dp-epsilon {privacy.budget:g} (delta {privacy.delta:g})"
        )
