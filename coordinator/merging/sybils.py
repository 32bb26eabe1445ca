"""Many identities do not add up to many voices, and no voice pushes harder than the round's usual.

Three rules shape each voice's merge weight (``shares``) and length (``clip_scale``) after
the round's judging, before the strategy sees it:

* **Probation.** An identity's weight is scaled by ``probation(accepted)``:
  ``(1 + min(accepted, PROBATION_SHARDS)) / (1 + PROBATION_SHARDS)``, from 1/9 for a new
  identity to 1 once it has ``PROBATION_SHARDS`` merged shards (its credit). On top of the
  reputation weight (start 0.5), so a fresh identity counts under a fifteenth of an
  established one (reputation near 0.9);
  in a fresh run every identity is on the same footing, and fedavg's weighted mean is
  unchanged.
* **Similarity (FoolsGold).** Each identity's voices are accumulated across the run's rounds
  (the sum of unit sketches of its merged voices, ``fold`` to ``SKETCH`` values, kept by the
  trusted side). Two voices are *alike* when the parts of their accumulated directions that
  the round's *other* voices do not explain point the same way: the cosine of their
  residuals after removing the mean direction of the others is at least ``SIMILAR``
  (``groups``). Removing the others' direction is what lets a tiny model, where every
  honest delta points the same way, keep its honest voices apart: they share the others'
  direction and differ by their data, while Sybils pushing one direction share what the
  others lack. Alike voices (connected through alike pairs) form a group, which shares one
  voice's weight: each member weighs ``1 / size`` of its own. Pairs are judged only with a
  third voice in the round; cost O(voices^2 x SKETCH) per round.
* **Clipping.** A voice longer than ``CLIP_RATIO`` x the round's lower median voice norm (with
  fewer than three voices, ``HISTORY_CLIP_RATIO`` x the median of recently merged voices) is
  scaled down to it
  (``clip_bound``): a boosted backdoor moves the model no more than an ordinary voice.
* **Outliers** (``init --outliers drop``, off by default). FLAME's clustering (Nguyen et al.,
  USENIX Security 2022), approximated without HDBSCAN: with ``m`` = a majority of the round's
  voices, a voice's core distance is the cosine distance of its sketch to its (m-1)-th
  nearest other voice, and the voices farther than the m-th smallest core distance merge at
  weight 0 and set no clip bound (``outliers``): only the round's densest majority moves the
  model. A backdoor trained on data of its own points away from the honest voices, which
  train the same corpus, so it is the one left out (docs/BENCHMARKS.md); with honest voices
  only, the
  voices left out are honest ones, a round's worth of their data unused (not rejected: no
  reputation or credit lost). Nothing is left out under three voices.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from coordinator.merging.verification import weigh
from coordinator.store import Store

# Merged shards an identity needs before its voice counts in full.
PROBATION_SHARDS = 8
# Accumulated directions are compared through this many values (a signed fold of ``sketch``).
SKETCH = 4096
# Residual cosine at or above which two voices are one group (honest pairs: docs/SECURITY.md).
SIMILAR = 0.8
# A voice is clipped to this multiple of the round's lower median voice norm; in a round of
# fewer than three voices, to HISTORY_CLIP_RATIO x the median of recently merged voices (a lone
# honest voice is not cut to the past's median as norms drift, a 5x boosted one still is).
CLIP_RATIO = 1.0
HISTORY_CLIP_RATIO = 2.0
_FOLD_SEED = 20260


def probation(accepted: int) -> float:
    """The merge-weight factor of an identity with ``accepted`` merged shards (1/9 new, then up to 1)."""
    done = min(max(int(accepted), 0), PROBATION_SHARDS)
    return (1 + done) / (1 + PROBATION_SHARDS)


def clip_bound(
    voice_norms: Sequence[float],
    history: Sequence[float],
    ratio: float = CLIP_RATIO,
    past_ratio: float = HISTORY_CLIP_RATIO,
) -> float | None:
    """The longest voice norm merged in full: ``ratio`` x the round's lower median voice (3 or
    more: half the voices boosted cannot raise it), else ``past_ratio`` x the median of recently
    merged voices; None when there is no yardstick."""
    norms = [n for n in voice_norms if math.isfinite(n) and n > 0]
    past = [n for n in history if math.isfinite(n) and n > 0]
    if len(norms) >= 3:
        return ratio * statistics.median_low(norms)
    if past:
        return past_ratio * statistics.median(past)
    return None


def clip_scale(norm: float, bound: float | None) -> float:
    """What a voice of ``norm`` is multiplied by to stay within ``bound`` (1 when it does)."""
    if bound is None or not norm > bound:
        return 1.0
    return bound / norm


def fold(values: torch.Tensor) -> torch.Tensor:
    """A unit float32 vector of at most ``SKETCH`` values whose cosines estimate ``values``'.

    Longer vectors are folded with fixed random signs (a count sketch of a count sketch);
    a zero vector stays zero.
    """
    flat = values.detach().reshape(-1).double()
    if flat.numel() > SKETCH:
        size = flat.numel()
        signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(_FOLD_SEED + size))
        flat = flat * (signs.double() * 2 - 1)
        padded = torch.zeros(-(-size // SKETCH) * SKETCH, dtype=torch.float64)
        padded[:size] = flat
        flat = padded.view(-1, SKETCH).sum(0)
    norm = float(flat.norm())
    return (flat / norm if norm > 0 else flat).float()


def accumulate(previous: torch.Tensor | None, voice: torch.Tensor) -> torch.Tensor:
    """An identity's accumulated direction after one more merged voice (``voice`` from ``fold``)."""
    if previous is None or previous.shape != voice.shape:
        return voice.clone()
    return previous + voice


def groups(
    accumulated: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
) -> dict[str, str]:
    """Each voice in a group of alike voices -> the group's id (its first member's name, sorted).

    ``weights`` (each voice's record: probation x reputation) place the centre (``pair_cosines``).
    """
    names = sorted(accumulated)
    parent = {n: n for n in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for (a, b), cosine in pair_cosines(accumulated, weights).items():
        if cosine >= SIMILAR:
            first, second = sorted((root(a), root(b)))
            parent[second] = first
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(root(name), []).append(name)
    return {name: min(group) for group in members.values() if len(group) > 1 for name in group}


def pair_cosines(
    accumulated: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None
) -> dict[tuple[str, str], float]:
    """Each pair's cosine of residuals (names sorted); none with fewer than three voices.

    A voice's residual is its unit accumulated direction less its projection on
    the round's centre, the coordinate-wise median of those directions weighted
    by ``weights`` (equal without): what the voices holding most of the round's
    record do not explain. So new identities cannot move the centre, and two
    established honest voices beside two new Sybils are not a pair of their own.
    Voices of different sketch sizes or with no direction are compared with no one.
    """
    names = sorted(n for n, v in accumulated.items() if float(v.norm()) > 0)
    if len(names) < 3 or len({accumulated[n].numel() for n in names}) != 1:
        return {}
    units = torch.stack([accumulated[n].double() / accumulated[n].double().norm() for n in names])
    record = torch.tensor([max(float((weights or {}).get(n, 1.0)), 1e-6) for n in names], dtype=torch.float64)
    centre = weighted_median(units, record)
    size = float(centre.norm())
    if size > 0:
        centre = centre / size
        units = units - (units @ centre).unsqueeze(1) * centre
    lengths = units.norm(dim=1)
    gram = units @ units.T
    out = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            scale = float(lengths[a] * lengths[b])
            # a voice the centre explains wholly has nothing of its own to share
            out[(names[a], names[b])] = float(gram[a, b]) / scale if scale > 1e-12 else 0.0
    return out


def weighted_median(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each column's lower weighted median of ``rows`` (one weight per row)."""
    ordered, index = rows.sort(dim=0)
    cumulative = weights[index].cumsum(0)
    pick = (cumulative >= cumulative[-1:] / 2).to(torch.int8).argmax(dim=0, keepdim=True)
    return ordered.gather(0, pick).squeeze(0)


def shares(weights: Mapping[str, float], grouped: Mapping[str, str]) -> dict[str, float]:
    """Each voice's merge weight once a group shares one voice's: ``1 / size`` of its own."""
    size: dict[str, int] = {}
    for group in grouped.values():
        size[group] = size.get(group, 0) + 1
    return {name: w / size.get(grouped.get(name, ""), 1) for name, w in weights.items()}


def encode(vector: torch.Tensor) -> bytes:
    """An accumulated direction as the trusted side stores it (float32, little-endian)."""
    return vector.float().contiguous().numpy().astype("<f4").tobytes()


def decode(raw: bytes | None) -> torch.Tensor | None:
    """A stored accumulated direction; None for a missing, oversized or non-finite one."""
    if raw is None or len(raw) % 4 or not 0 < len(raw) <= 4 * SKETCH:
        return None
    vector = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    return vector if bool(torch.isfinite(vector).all()) else None


def outliers(sketches: Mapping[str, torch.Tensor]) -> set[str]:
    """The voices outside the round's densest majority by cosine distance (none under 3 voices).

    ``sketches``: each voice's sketch of this round's delta (``verification.sketch``). A voice
    with no direction, or of another sketch size, is never an outlier.
    """
    names = sorted(n for n, v in sketches.items() if v.numel() and float(v.double().norm()) > 0)
    if len(names) < 3 or len({sketches[n].numel() for n in names}) != 1:
        return set()
    units = torch.stack([sketches[n].double() / sketches[n].double().norm() for n in names])
    distance = 1 - units @ units.T
    distance.fill_diagonal_(math.inf)
    majority = len(names) // 2 + 1
    core = distance.sort(dim=1).values[:, majority - 2]  # to the (m-1)-th nearest other voice
    cut = float(core.sort().values[majority - 1])
    return {name for name, c in zip(names, core.tolist(), strict=True) if c > cut}


@dataclass
class Plan:
    """One round's shaping of its voices: weight factors, the clip bound, what to remember after."""

    factors: dict[str, float]
    bound: float | None
    accumulated: dict[str, torch.Tensor] = field(default_factory=dict)
    grouped: dict[str, str] = field(default_factory=dict)
    outliers: set[str] = field(default_factory=set)

    def weight(self, name: str, weight: float) -> float:
        return 0.0 if name in self.outliers else weight * self.factors.get(name, 1.0)


def plan_round(
    store: Store,
    run: str,
    names: list[str],
    sketches: Mapping[str, torch.Tensor],
    voice_norms: Sequence[float],
    history: Sequence[float],
    reputations: Mapping[str, float | None],
    drop_outliers: bool = False,
) -> Plan:
    """The round's ``Plan`` for its merged voices ``names`` (``sketches``: each one's ``sketch``,
    ``voice_norms``: each one's norm, in the same order); with ``drop_outliers`` the voices
    outside the densest majority weigh 0 (``outliers``) and set no clip bound."""
    stored = store.similarities(run, names)
    accumulated: dict[str, torch.Tensor] = {}
    for name in names:
        if name in sketches:
            accumulated[name] = accumulate(decode(stored.get(name)), fold(sketches[name]))
    records = store.accepted_shards(names)
    ramp = {name: probation(records[name]) for name in names}
    grouped = groups(accumulated, {name: weigh(ramp[name], reputations.get(name)) for name in names})
    factors = shares(ramp, grouped)
    dropped = (
        outliers({name: sketches[name] for name in names if name in sketches}) if drop_outliers else set()
    )
    if dropped:  # the voices left out set no bound (``voice_norms`` are in ``names``' order)
        voice_norms = [n for name, n in zip(names, voice_norms, strict=False) if name not in dropped]
    return Plan(factors, clip_bound(voice_norms, history), accumulated, grouped, dropped)


def remember(store: Store, run: str, plan: Plan) -> None:
    """After the round is published: its voices' accumulated directions and groups."""
    store.set_similarities(
        run,
        {name: encode(vector) for name, vector in plan.accumulated.items()},
        {name: plan.grouped.get(name) for name in plan.accumulated},
    )
