"""The probe's rules: which voices of a round to reject, probing only what the verdicts need.

A voice is judged by two pieces of evidence (``coordinator.merging.verification``
measures them): its *gain*, how much it lowers the loss on the job's probe set
at its share of the merge, and its *agreement*, the cosine between its
direction and the round's other voices' directions weighted by reputation.

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
them. Such a voice is not probe noise: gpt nano's shard of other files raised
the loss on 64 held-out batches as much as on the 8 probe batches
(docs/BENCHMARKS.md), so the band is measured from the round's other voices,
not from the probe's sampling error. A round of one voice is judged too: it
must not raise the probe loss by more than ``NOISE`` x the resolution of the
run's last update at the usual norm (``verification.lone_resolution``).

**Only what a verdict needs is probed.** Agreement and norm are known for every
voice before any probe pass (they come from the voice's sketch and its decode),
and only a voice under ``AGREEMENT`` can be doubted. A gain is one probe pass and a
cost another, so ``judge`` asks for them one at a time (``Gain``, ``Cost``) and
stops as soon as the ones still unknown, taken anywhere from minus to plus
infinity (costs from 0), can no longer change any verdict: the others' median
gain, their deviation and the resolution are then known within bounds
(``_Bounds``) that give one verdict. That is the verdict every gain and cost
measured gives (``tests/coordinator/test_verification.py`` judges random
rounds both ways). A round in which every voice follows the others needs no
probe pass at all.
"""

from __future__ import annotations

import math
import secrets
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# A voice gaining less than this fraction of the others' median gain, and more than SPREAD
# robust standard deviations (1.4826 MAD) below it, is far worse than them.
USEFUL_FRACTION = 0.1
SPREAD = 3.0
MAD_SCALE = 1.4826
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
RESOLUTION_PEERS = 8
_RANDOM = secrets.SystemRandom()


@dataclass(frozen=True)
class Evidence:
    """What the aggregator measured of one voice: probe gain (None: not yet), delta norm, agreement."""

    gain: float | None
    norm: float = 1.0
    agreement: float = 0.0


# (voice) -> its probe gain (``Prober.gain``), measured only when asked
Gain = Callable[[str], float]
# (voice) -> the probe's resolution for its step (``Prober.cost``), measured only when asked
Cost = Callable[[str], float]


def judge(
    evidence: Mapping[str, Evidence],
    cost: Cost | None = None,
    lone_resolution: float | None = None,
    gain: Gain | None = None,
) -> dict[str, str]:
    """The voices to reject, with a reason containing ``probe``; the others are kept.

    Each voice is measured against the *other* voices, so one bad voice cannot
    shift its own bar. A rule that finds a voice worse than the others rejects
    it only if its shortfall exceeds the probe's noise band: ``NOISE`` x the
    probe's resolution, the median ``cost`` of the others' steps (each at their
    median norm; in a large round, of ``RESOLUTION_PEERS`` of them drawn from
    those that follow the others: ``_resolution_pool``), what a step of the
    round's usual length and kind costs on the probe whatever its direction
    (not the voice's own: a step in a sharp direction, an ascender's, costs far
    more and would widen its own band); for harm, ``_honest_shortfall`` if
    larger; the band narrows as the voice's agreement falls under theirs. A
    lone voice is rejected when it raises the probe loss by more than ``NOISE``
    x ``lone_resolution``. A gain missing from ``evidence`` is asked of
    ``gain`` when, and only if, a verdict needs it.
    """
    gains = _Gains(evidence, gain)
    reasons: dict[str, str] = {}
    if len(evidence) == 1:
        ((name, _),) = evidence.items()
        raised = -gains.get(name)
        if lone_resolution is not None and raised > NOISE * lone_resolution:
            reasons[name] = (
                f"probe: a lone voice that raises the probe loss by {raised:.3g}, "
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
    # verdicts on them, so the order of judging changes no bar. Only a voice that does not
    # clearly follow them can be doubted by a rule.
    screened = [name for name in evidence if name not in reasons]
    doubtful = (
        [name for name in screened if evidence[name].agreement < AGREEMENT] if len(screened) > 1 else []
    )
    pool = _resolution_pool(screened, evidence)
    rest = [name for name in screened if name not in pool]
    order = pool + _RANDOM.sample(rest, len(rest))  # whose gains to probe first: the pool's are needed
    costs: dict[str, float] = {}
    for name in doubtful:
        gains.get(name)
    for name in doubtful:
        peers = [other for other in screened if other != name]
        measured = [other for other in pool if other != name][:RESOLUTION_PEERS]
        usual_norm = statistics.median(evidence[other].norm for other in peers)
        case = _Case(evidence[name], gains.get(name), peers, evidence, cost is not None)
        while (
            verdict := case.verdict(gains.known, _resolution_costs(costs, measured, evidence, usual_norm))
        ) is None:
            unknown_cost = next((other for other in measured if other not in costs), None)
            if cost is not None and unknown_cost is not None and case.wants_resolution:
                gains.get(unknown_cost)  # a cost needs the voice's gain: it is one of the peers' too
                costs[unknown_cost] = max(0.0, cost(unknown_cost))  # never negative (``Prober.cost``)
                continue
            unknown_gain = next((o for o in order if o != name and o not in gains.known), None)
            if unknown_gain is None:  # every gain and cost known: the bounds are exact
                raise AssertionError(f"no verdict on {name} with everything measured")
            gains.get(unknown_gain)
        if verdict:
            reasons[name] = verdict
    return reasons


class _Gains:
    """The voices' gains: those in the evidence, and those asked of ``gain`` (each once)."""

    def __init__(self, evidence: Mapping[str, Evidence], gain: Gain | None) -> None:
        self.known = {name: seen.gain for name, seen in evidence.items() if seen.gain is not None}
        self._gain = gain

    def get(self, name: str) -> float:
        if name not in self.known:
            if self._gain is None:
                raise ValueError(f"no gain measured for {name} and nothing to measure it with")
            self.known[name] = self._gain(name)
        return self.known[name]


def _resolution_costs(
    costs: Mapping[str, float], measured: list[str], evidence: Mapping[str, Evidence], usual_norm: float
) -> tuple[list[float], int]:
    """The resolution's costs known so far, each at the usual norm, and how many are still unknown."""
    known = [
        scaled_cost(costs[other], evidence[other].norm, usual_norm) for other in measured if other in costs
    ]
    return known, len(measured) - len(known)


@dataclass(frozen=True)
class _Bounds:
    """A quantity known to lie in [low, high]: a point once everything it depends on is measured."""

    low: float
    high: float

    @classmethod
    def median(cls, known: list[float], unknown: int, lowest: float = -math.inf) -> _Bounds:
        """The median of ``known`` and ``unknown`` more values anywhere from ``lowest`` up.

        A median never falls as one of its values grows, so all the unknown at
        ``lowest`` and all at infinity bound it.
        """
        if not known and not unknown:
            return cls(0.0, 0.0)
        low = statistics.median(known + [lowest] * unknown)
        return cls(low, statistics.median(known + [math.inf] * unknown))

    def distance(self, value: float) -> _Bounds:
        """Bounds of |value - x| for x within these bounds."""
        ends = (abs(value - self.low), abs(value - self.high))
        near = 0.0 if self.low <= value <= self.high else min(ends)
        return _Bounds(near, max(ends))


class _Case:
    """One doubtful voice's verdict against its peers, as far as their gains and costs are known."""

    def __init__(
        self, seen: Evidence, gain: float, peers: list[str], evidence: Mapping[str, Evidence], with_cost: bool
    ) -> None:
        self.gain = gain
        self.agreement = seen.agreement
        self.peers = peers
        self.with_cost = with_cost
        # the probe's noise band (module docstring), narrowed as the voice turns from the others:
        # by how far its cosine with them falls under their own
        gap = statistics.median(evidence[other].agreement for other in peers) - seen.agreement
        self.narrowed = min(1.0, max(0.0, 1.0 - gap))
        self.wants_resolution = False  # whether the resolution is what keeps the verdict open

    def verdict(self, gains: Mapping[str, float], costs: tuple[list[float], int]) -> str | None:
        """The reason to reject, "" to keep, None while the unknown gains and costs could go either way."""
        self.wants_resolution = False
        known = [gains[other] for other in self.peers if other in gains]
        unknown = len(self.peers) - len(known)
        typical = _Bounds.median(known, unknown)
        # their robust deviation: each known gain's distance to a median within bounds, the
        # unknown ones anywhere from 0 to infinitely far
        near = [typical.distance(g).low for g in known] + [0.0] * unknown
        far = [typical.distance(g).high for g in known] + [math.inf] * unknown
        deviation = _Bounds(MAD_SCALE * statistics.median(near), MAD_SCALE * statistics.median(far))
        found = self._rule(typical, deviation)
        if found is None:
            return None
        reason, harm = found
        if not reason:
            return ""
        resolution = _Bounds.median(*costs, lowest=0.0) if self.with_cost else _Bounds(0.0, 0.0)
        kept = self._within(typical, deviation, resolution, harm)
        if kept is None:
            self.wants_resolution = self.narrowed > 0.0 and resolution.low != resolution.high
            return None
        return "" if kept else reason

    def _rule(self, typical: _Bounds, deviation: _Bounds) -> tuple[str, bool] | None:
        """The rule that finds the voice worse than its peers: (reason, whether about harm), the
        reason "" if none does; None while the bounds allow either."""
        gain = self.gain
        if self.agreement < OPPOSED:
            below = _certain(gain < typical.low, gain >= typical.high)
            if below is None:
                return None
            if below:
                return (
                    f"probe: points against the round's other deltas (cosine {self.agreement:.2f}) "
                    f"and lowers the probe loss less than they do ({gain:.3g} against {_text(typical)})"
                ), True
        useful = _both(
            _certain(typical.low > 0, typical.high <= 0),
            _certain(gain >= USEFUL_FRACTION * typical.high, gain < USEFUL_FRACTION * typical.low),
        )
        far = _certain(
            gain < typical.low - SPREAD * deviation.high, gain >= typical.high - SPREAD * deviation.low
        )
        far_worse = _both(None if useful is None else not useful, far)
        if far_worse is None:
            return None
        if not far_worse:
            return "", False
        harm = gain < 0
        negated = _Bounds(-typical.high, -typical.low)
        reason = (
            f"probe: raises the probe loss by {-gain:.3g} while the round's others change it "
            f"by {_text(negated)}"
            if harm
            else f"probe: lowers the probe loss by {gain:.3g}, under {USEFUL_FRACTION:.0%} "
            f"of the round's others ({_text(typical)})"
        )
        return reason, harm

    def _within(self, typical: _Bounds, deviation: _Bounds, resolution: _Bounds, harm: bool) -> bool | None:
        """Whether the noise band holds the voice's shortfall under its peers' median gain.

        The band is ``NOISE`` x the resolution or, for harm, ``_honest_shortfall``
        if larger: it never shrinks as the resolution, the peers' gain or their
        deviation grows, so their bounds bound it.
        """
        shortfall = _Bounds(typical.low - self.gain, typical.high - self.gain)
        if self.narrowed == 0.0:  # no band left (and no infinite resolution times 0)
            return _certain(shortfall.high <= 0.0, shortfall.low > 0.0)
        bands = []
        for end, resolution_end, deviation_end in (
            (typical.low, resolution.low, deviation.low),
            (typical.high, resolution.high, deviation.high),
        ):
            band = NOISE * resolution_end
            if harm:
                band = max(band, _honest_shortfall(end, resolution_end, deviation_end))
            bands.append(band * self.narrowed)
        return _certain(shortfall.high <= bands[0], shortfall.low > bands[1])


def _certain(surely: bool, surely_not: bool) -> bool | None:
    """True, False, or None while the bounds allow both."""
    return True if surely else False if surely_not else None


def _both(first: bool | None, second: bool | None) -> bool | None:
    """``first and second`` when either may still be unknown (None)."""
    if first is False or second is False:
        return False
    if first is None or second is None:
        return None
    return True


def _text(value: _Bounds) -> str:
    """A median for a reason: its value, or its bounds when the verdict needed no more."""
    if value.low == value.high:
        return f"{value.low:.3g}"
    if math.isinf(value.high):
        return f"at least {value.low:.3g}"
    if math.isinf(value.low):
        return f"at most {value.high:.3g}"
    return f"{value.low:.3g} to {value.high:.3g}"


def _resolution_pool(screened: list[str], evidence: Mapping[str, Evidence]) -> list[str]:
    """The voices whose probe cost measures the resolution: every screened one in a small round.

    In a round of more than ``RESOLUTION_PEERS`` + 1 screened voices, ``RESOLUTION_PEERS`` + 1
    drawn with ``secrets`` from those that follow the others (agreement at least ``AGREEMENT``:
    no rule can doubt them); if too few do (on a sparse model honest voices barely agree), from
    those that do not point against them (at least ``OPPOSED``), and only then from all. Each
    cost is one more probe pass, and a doubted voice's step (an ascender's is sharp, so costly,
    and it points against the others) must not widen the band it is judged by.
    """
    if len(screened) <= RESOLUTION_PEERS + 1:
        return list(screened)
    for floor in (AGREEMENT, OPPOSED):
        source = [name for name in screened if evidence[name].agreement >= floor]
        if len(source) > RESOLUTION_PEERS:
            break
    else:
        source = screened
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


def scaled_cost(cost: float, norm: float, usual: float | None) -> float:
    """A step's probe cost at the usual norm instead of its own (the cost grows as the square)."""
    if usual is None or usual <= 0 or norm <= 0:
        return cost
    return cost * (usual / norm) ** 2
