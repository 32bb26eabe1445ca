"""Probe scoring: the rule that judges a voice against the round's others, and reputation."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from broker import keys
from coordinator.merging import rules
from coordinator.merging.judging import probe_voices
from coordinator.merging.rules import RESOLUTION_PEERS, Evidence, judge
from coordinator.merging.verification import (
    SKETCH,
    START_REPUTATION,
    Consensus,
    Prober,
    copies,
    disagreement,
    next_reputation,
    probe_loss,
    sketch,
    weigh,
)
from coordinator.rounds.validation import delta_norm
from jobs import load_job
from tests.fixtures.jobs_tiny import TinyJob
from tests.fixtures.lying_jobs import RandomTokens
from volunteer.trainer import train_shard


def _judge(gains: dict[str, float], agreement: float = 0.5, **special: Evidence) -> dict[str, str]:
    """Judge voices that all follow the round's direction, except those given in full."""
    return judge({**{name: Evidence(gain, 1.0, agreement) for name, gain in gains.items()}, **special})


def test_a_voice_that_raises_the_loss_and_turns_away_from_the_others_is_rejected():
    reasons = _judge({"alice": 0.30, "bob": 0.25}, mallory=Evidence(-0.28, 1.0, -0.6))
    assert set(reasons) == {"mallory"} and "probe" in reasons["mallory"]
    assert "points against the round's other deltas" in reasons["mallory"]


def test_a_voice_far_worse_on_the_probe_that_barely_follows_the_others_is_rejected():
    gains = {"alice": 0.30, "bob": 0.25, "carol": 0.28}
    reasons = _judge(gains, junk=Evidence(-0.20, 1.0, 0.05))
    assert set(reasons) == {"junk"} and "raises the probe loss" in reasons["junk"]
    reasons = _judge(gains, idler=Evidence(0.001, 1.0, 0.05))
    assert set(reasons) == {"idler"} and "under 10%" in reasons["idler"]


def test_an_honest_voice_the_noisy_probe_dislikes_is_kept_while_it_follows_the_others():
    """Late in training an honest voice on other files may raise the probe a little (measured)."""
    reasons = _judge({"a": 0.003, "b": 0.002, "c": 0.0025}, late=Evidence(-0.002, 1.0, 0.35))
    assert reasons == {}


def test_a_voice_turned_away_from_the_others_but_more_useful_on_the_probe_is_kept():
    assert _judge({"a": 0.30, "b": 0.25}, odd=Evidence(0.40, 1.0, -0.2)) == {}


def test_honest_voices_of_different_usefulness_are_all_kept():
    assert _judge({"a": 0.30, "b": 0.12, "c": 0.05, "d": 0.41}) == {}


def test_the_verdicts_do_not_depend_on_the_order_voices_are_judged_in():
    """A round where half the voices are bad (seen in the process test, 1 run in about 25).

    The honest voice h1 is the least useful one, and the attackers drag its
    agreement just under zero. Judged after both attackers, it once met a bar
    set by the other honest voices alone and was rejected; judged first, it
    was kept. Every voice now meets the same bar: all the others that passed
    the norm screen.
    """
    voices = {
        "negator": Evidence(-0.00317, 1.0, -0.92),
        "h2": Evidence(0.0037, 1.0, 0.3),
        "ascender": Evidence(-0.00323, 1.0, -0.94),
        "h1": Evidence(0.00264, 1.0, -0.09),
        "h3": Evidence(0.0040, 1.0, 0.3),
        "free-rider": Evidence(0.0, 1e-4, 0.0),
    }
    verdicts = judge(voices)
    assert set(verdicts) == {"negator", "ascender", "free-rider"}, verdicts
    assert judge(dict(reversed(voices.items()))) == verdicts


def test_a_lone_voice_needs_the_probes_resolution_and_a_voice_that_follows_a_still_round_is_kept():
    assert judge({"alone": Evidence(-1.0, 1.0, -1.0)}) == {}  # no resolution measured: nothing to go by
    assert set(judge({"alone": Evidence(-1.0, 1.0, -1.0)}, lone_resolution=0.1)) == {"alone"}
    assert judge({"alone": Evidence(-0.15, 1.0, -1.0)}, lone_resolution=0.1) == {}
    assert _judge({"a": -0.01, "b": -0.02, "c": 0.0}) == {}


def test_agreement_is_the_cosine_with_the_others_weighted_directions_leaving_itself_out():
    east, north = {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}
    west = {"w": torch.tensor([-5.0, 0.0])}
    consensus = Consensus()
    for delta, weight in ((east, 1.0), (north, 1.0), (west, 0.1)):
        consensus.add(delta, weight)
    # the others of east: north (1.0) and west (0.1), as unit directions: (-0.1, 1)
    assert consensus.agreement(east, 1.0) == pytest.approx(-0.1 / (1.01**0.5))
    # the others of west: east and north, equally weighted: (1, 1)
    assert consensus.agreement(west, 0.1) == pytest.approx(-(0.5**0.5))
    assert consensus.agreement({"w": torch.zeros(2)}, 1.0) == 0.0
    alone = Consensus()
    alone.add(east, 1.0)
    assert alone.agreement(east, 1.0) == 0.0  # nobody else: no direction to follow


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
    reasons = judge({name: Evidence(gains[name], norms[name], 0.9) for name in gains})
    assert set(reasons) == {"freeloader"} and "probe" in reasons["freeloader"]
    assert "too small" in reasons["freeloader"]
    # caught even while the others gain nothing on the probe
    still = {name: Evidence(-0.001, norms[name], 0.9) for name in gains}
    assert set(judge(still)) == {"freeloader"}


def test_two_trainings_of_a_shard_agree_up_to_floating_point_noise_and_not_beyond():
    gen = torch.Generator().manual_seed(0)
    honest = {"w": torch.randn(64, 8, generator=gen), "b": torch.randn(8, generator=gen)}
    noisy = {k: v * (1 + 1e-3 * torch.randn(v.shape, generator=gen)) for k, v in honest.items()}
    assert disagreement(honest, noisy) is None
    other = {k: torch.randn(v.shape, generator=gen) for k, v in honest.items()}
    assert "cosine" in (disagreement(honest, other) or "")
    assert "norm ratio" in (disagreement(honest, {k: 3 * v for k, v in honest.items()}) or "")


def test_a_trainer_on_random_tokens_is_rejected_among_honest_charlm_voices():
    """The issue's junk trainer, through the aggregator's own judging of a round's voices."""
    job = load_job(
        "charlm", {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 40, "eval_batches": 4}
    )
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    trainers = {"h0": job, "h1": job, "h2": job, "junk": RandomTokens(job)}
    deltas = {
        name: train_shard(
            trainer, weights, shard=i, shards=4, steps=10, lr=3e-3, device=torch.device("cpu"), seed=i
        ).delta
        for i, (name, trainer) in enumerate(trainers.items())
    }
    used = {i: keys.accepted_upload("r", 1, name, i, "t") for i, name in enumerate(deltas)}
    rejected = probe_voices(job, weights, used, lambda shards: deltas[list(deltas)[shards[0]]], {})
    assert [(shard, name) for shard, name, _ in rejected] == [(3, "junk")]
    assert rejected[0][2].startswith("probe:")


# --- near convergence, a lone voice, copies -----------------------------------------------------
def _tiny_base() -> tuple[TinyJob, dict[str, torch.Tensor]]:
    job = TinyJob()
    return job, {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}


def test_a_voice_worse_than_the_others_only_within_the_probes_noise_is_kept():
    """The noisy regression near convergence: gains 0.0087, 0.0167, 0.0094; 0.0078 at cosine -0.07."""
    voices = {
        "h1": Evidence(0.00874, 0.34, 0.40),
        "h2": Evidence(0.00784, 0.34, -0.07),
        "h3": Evidence(0.01669, 0.34, 0.46),
        "h4": Evidence(0.00936, 0.34, 0.58),
    }
    # what any step of that length costs on the probe (measured by probing it both ways)
    assert judge(voices) == {} and judge(voices, cost=lambda name: 0.0072) == {}
    # the same voice reversed: it falls twice the round's gain below, pointing against the others
    reversed_ = {**voices, "h2": Evidence(-0.0094 - 2 * 0.0015, 0.34, -0.9)}
    assert set(judge(reversed_, cost=lambda name: 0.0015)) == {"h2"}


def test_the_probes_resolution_is_the_others_steps_not_the_judged_voices_own():
    """charlm round 7 (measured): an ascender's sharp step costs 0.107 on the probe, honest ones 0.0015."""
    voices = {
        "h0": Evidence(0.0094, 1.0, 0.5),
        "h1": Evidence(0.0061, 1.0, 0.5),
        "h2": Evidence(0.0120, 1.0, 0.5),
        "ascender": Evidence(-0.1246, 1.0, -0.6),
    }
    costs = {"h0": 0.0020, "h1": 0.0013, "h2": 0.0015, "ascender": 0.1067}
    assert set(judge(voices, cost=costs.__getitem__)) == {"ascender"}


def test_a_large_round_measures_the_resolution_on_a_few_undoubted_voices_and_still_rejects_ascenders():
    """40 honest voices and 8 ascenders (charlm round 7's figures): each measured cost is a probe pass.

    Every voice's cost measured would be 48 passes; the resolution needs RESOLUTION_PEERS + 1, drawn
    from voices no rule doubts, so an ascender's sharp step never widens the band (0.107 against 0.0015:
    had the ascenders' costs been the median, the band would have let them through).
    """
    voices = {f"h{i}": Evidence(0.0061 + 0.0059 * (i % 7) / 6, 1.0, 0.5) for i in range(40)}
    voices |= {f"ascender{i}": Evidence(-0.1246, 1.0, -0.6) for i in range(8)}
    measured: list[str] = []

    def cost(name: str) -> float:
        measured.append(name)
        return 0.1067 if name.startswith("ascender") else 0.0015

    for _ in range(20):  # the pool is drawn anew each round
        measured.clear()
        assert set(judge(voices, cost=cost)) == {f"ascender{i}" for i in range(8)}
        assert len(set(measured)) == len(measured) <= RESOLUTION_PEERS + 1
        assert not any(name.startswith("ascender") for name in measured)
    # a small round measures the other voices, never the judged one: the band is theirs
    measured.clear()
    judge({name: voices[name] for name in ["h0", "h1", "h2", "ascender0"]}, cost=cost)
    assert set(measured) <= {"h0", "h1", "h2"}


def test_on_a_sparse_model_where_honest_voices_barely_agree_the_resolution_still_leaves_ascenders_out():
    """Honest agreement near 0 (under AGREEMENT, as on click or gpt nano): the pool falls back to the
    voices that do not point against the others, never to the ascenders (agreement -0.6)."""
    voices = {f"h{i}": Evidence(0.0061 + 0.0059 * (i % 7) / 6, 1.0, 0.02 + 0.001 * i) for i in range(40)}
    voices |= {f"ascender{i}": Evidence(-0.1246, 1.0, -0.6) for i in range(8)}
    measured: list[str] = []

    def cost(name: str) -> float:
        measured.append(name)
        return 0.1067 if name.startswith("ascender") else 0.0015

    for _ in range(20):
        measured.clear()
        assert set(judge(voices, cost=cost)) == {f"ascender{i}" for i in range(8)}
        assert measured and not any(name.startswith("ascender") for name in measured), measured


def _every_probe(evidence: dict[str, Evidence], costs: dict[str, float]) -> dict[str, str]:
    """The probe's rules with every gain and every resolution cost measured: the test's oracle.

    Written out plainly from the rules (docs/SECURITY.md, ``rules`` module docstring), as
    ``judge`` was before it learned to skip the probe passes a verdict does not need. Call it
    with ``rules._RANDOM`` seeded as for ``judge``: it draws the same resolution pool.
    """
    reasons = {}
    for name, seen in evidence.items():
        usual = [e.norm for other, e in evidence.items() if other != name]
        if seen.norm < rules.NORM_FLOOR * statistics.median(usual):
            reasons[name] = "norm"
    screened = [name for name in evidence if name not in reasons]
    doubtful = [name for name in screened if evidence[name].agreement < rules.AGREEMENT]
    pool = rules._resolution_pool(screened, evidence)
    for name in doubtful:
        seen = evidence[name]
        peers = [other for other in screened if other != name]
        gains = [evidence[other].gain for other in peers]
        typical = statistics.median(gains)
        deviation = 1.4826 * statistics.median(abs(g - typical) for g in gains)
        if seen.agreement < rules.OPPOSED and seen.gain < typical:
            harm = True
        elif (not (typical > 0 and seen.gain >= 0.1 * typical)) and seen.gain < typical - 3 * deviation:
            harm = seen.gain < 0
        else:
            continue
        usual_norm = statistics.median(evidence[other].norm for other in peers)
        measured = [other for other in pool if other != name][:RESOLUTION_PEERS]
        scaled = [rules.scaled_cost(costs[other], evidence[other].norm, usual_norm) for other in measured]
        resolution = statistics.median(scaled) if scaled else 0.0
        narrowed = min(
            1.0, max(0.0, 1.0 - (statistics.median(evidence[o].agreement for o in peers) - seen.agreement))
        )
        band = rules.NOISE * resolution
        if harm:
            band = max(band, rules._honest_shortfall(typical, resolution, deviation))
        shortfall = typical - seen.gain
        if shortfall > (band * narrowed if narrowed > 0 else 0.0):
            reasons[name] = "probe"
    return reasons


def test_only_the_gains_and_costs_a_verdict_needs_are_probed_and_the_verdicts_are_those_of_every_probe(
    monkeypatch,
):
    """Random rounds judged as ``judge`` does, asking for each gain and cost, and by the oracle.

    The unknown gains and costs bound the others' median gain, their deviation and the
    resolution; once the bounds give one verdict, measuring the rest changes nothing. So the
    verdicts must be the oracle's, for fewer probe passes; were a verdict taken before the
    bounds settle it, some of these rounds would differ.
    """
    rng = random.Random(7)
    asked = {"gains": 0, "costs": 0, "every": 0}
    for _ in range(1500):
        spread = rng.choice([0.001, 0.006, 0.03, 0.3])  # the honest gains' spread, and a few far out
        voices = {
            f"v{i}": Evidence(
                rng.gauss(0.01, spread if rng.random() < 0.9 else 3.0),
                rng.uniform(0.5, 2.0),
                rng.uniform(-0.05, 0.7),
            )
            for i in range(rng.randint(3, 40))
        }
        for i in range(rng.randint(0, 4)):  # doubtful: reversed, idle or harmful, near and far
            voices[f"bad{i}"] = Evidence(
                rng.uniform(-0.05, 0.005), rng.uniform(0.02, 1.5), rng.uniform(-0.6, 0.3)
            )
        costs = {
            name: rng.choice([0.0, rng.uniform(0.0005, 0.02), rng.uniform(0, 0.5), -0.001]) for name in voices
        }
        monkeypatch.setattr(rules, "_RANDOM", random.Random(1))  # the same pool both ways
        oracle = _every_probe(voices, {name: max(0.0, c) for name, c in costs.items()})
        monkeypatch.setattr(rules, "_RANDOM", random.Random(1))

        def gain(name: str, voices: dict = voices) -> float:
            asked["gains"] += 1
            return voices[name].gain

        def cost(name: str, costs: dict = costs) -> float:
            asked["costs"] += 1
            return costs[name]

        unknown = {name: Evidence(None, seen.norm, seen.agreement) for name, seen in voices.items()}
        found = judge(unknown, cost=cost, gain=gain)
        assert {
            name: "norm" if "of the round's others (" in why and "norm" in why else "probe"
            for name, why in found.items()
        } == oracle
        asked["every"] += len(voices)
    assert asked["gains"] < asked["every"], asked


def test_a_large_round_with_a_few_reversed_voices_probes_about_half_of_the_others():
    """32 voices that follow each other and 4 reversed ones: the reversed are rejected once more
    than half the others' gains bound the median, and the resolution's costs are known."""
    voices = {f"h{i}": Evidence(None, 1.0, 0.4 + 0.01 * i) for i in range(32)}
    voices |= {f"reversed{i}": Evidence(None, 1.0, -0.3) for i in range(4)}
    probed: list[str] = []

    def gain(name: str) -> float:
        probed.append(name)
        return -0.06 if name.startswith("reversed") else 0.06 + 0.0001 * int(name[1:])

    rejected = judge(voices, cost=lambda name: 0.001, gain=gain)
    assert set(rejected) == {f"reversed{i}" for i in range(4)}
    assert "against at least" in rejected["reversed0"] or "against 0.06" in rejected["reversed0"]
    assert len(probed) == len(set(probed)) <= 4 + 22, probed


def test_a_round_whose_voices_all_follow_each_other_is_not_probed():
    """Only a voice under AGREEMENT can be doubted: with none, no gain, cost or base pass is measured."""
    voices = {f"v{i}": Evidence(None, 1.0, 0.3 + 0.01 * i) for i in range(12)}

    def never(name: str) -> float:
        raise AssertionError(f"probed {name}")

    assert judge(voices, cost=never, gain=never) == {}


def test_an_honest_voice_on_other_data_is_kept_while_the_reversal_of_an_honest_one_is_not():
    """gpt nano, four honest voices (measured: bench/judging_matrix.py --jobs gpt --seed 0 and 1).

    h1 trains on other files and raises the probe loss in every round (as much on
    64 other held-out batches: not probe noise) at a cosine near 0 with the others;
    in these rounds it fell 2.9x and 3.3x the others' median gain below them, past
    3x that gain, and was rejected. An honest voice whose direction misses the
    others' falls short by their gain plus its step's curvature, plus their spread.
    """
    rounds = [
        (  # seed 0, round 14: (gain, norm, agreement), probe cost of the voice's step
            {"h0": (0.04036, 5.80, 0.14), "h1": (-0.04258, 7.33, -0.07), "h2": (0.00483, 6.28, 0.11)},
            {"h3": (0.02186, 6.45, 0.10)},
            {"h0": 0.01098, "h1": 0.02163, "h2": 0.01757, "h3": 0.01492},
        ),
        (  # seed 1, round 13
            {"h0": (0.01751, 5.71, 0.16), "h1": (-0.03956, 6.71, -0.01), "h2": (0.00397, 6.02, 0.14)},
            {"h3": (0.02649, 6.59, 0.09)},
            {"h0": 0.00924, "h1": 0.02292, "h2": 0.01087, "h3": 0.01508},
        ),
    ]
    for first, last, costs in rounds:
        voices = {name: Evidence(*seen) for name, seen in {**first, **last}.items()}
        assert judge(voices, cost=costs.__getitem__) == {}
        # h1's place taken by h0 reversed: -(gain) - 2 x cost, its cosine mirrored
        h0 = voices["h0"]
        reversed_ = {name: seen for name, seen in voices.items() if name != "h1"}
        reversed_["neg"] = Evidence(-h0.gain - 2 * costs["h0"], h0.norm, -h0.agreement)
        assert set(judge(reversed_, cost={**costs, "neg": costs["h0"]}.__getitem__)) == {"neg"}


def test_a_lone_voice_is_probed_on_its_own_and_rejected_only_beyond_the_probes_noise():
    job, base = _tiny_base()
    toward = {"weight": 0.2 * (job.true_w.T - base["weight"]), "bias": -0.2 * base["bias"]}
    away = {k: -3 * v for k, v in toward.items()}  # the issue's -3 x (the last update)
    used = {0: keys.accepted_upload("r", 1, "ann", 0, "t")}
    assert probe_voices(job, base, used, lambda shards: toward, {}) == []
    usual = delta_norm(toward)
    for last in (None, toward):  # before any update; measured against the last one
        rejected = probe_voices(job, base, used, lambda shards: away, {}, usual_norm=usual, last=last)
        assert [(shard, name) for shard, name, _ in rejected] == [(0, "ann")]
        assert rejected[0][2].startswith("probe: a lone voice")
    assert probe_voices(job, base, used, lambda shards: toward, {}, usual_norm=usual, last=toward) == []


def test_a_re_encoded_copy_of_another_voice_or_of_the_last_update_is_refused_as_a_copy():
    gen = torch.Generator().manual_seed(1)
    shared = torch.randn(400, generator=gen)
    honest = {n: {"w": shared + 0.2 * torch.randn(400, generator=gen)} for n in ("ann", "ben")}
    copied = {"w": honest["ann"]["w"].half().float()}  # through another codec
    sketches = {name: sketch(delta) for name, delta in {**honest, "mal": copied}.items()}
    reasons = copies(sketches, None, {"ann": 0.9, "ben": 0.8, "mal": None})
    assert set(reasons) == {"mal"} and reasons["mal"].startswith("copy:") and "ann" in reasons["mal"]
    assert copies({n: sketches[n] for n in ("ann", "ben")}, None, {}) == {}  # honest: cosine ~0.96
    last = sketch({"w": 0.5 * (honest["ann"]["w"] + honest["ben"]["w"])})
    replay = {"w": 0.5 * (honest["ann"]["w"] + honest["ben"]["w"]).half().float()}
    reasons = copies({"ann": sketches["ann"], "mal": sketch(replay)}, last, {})
    assert list(reasons) == ["mal"] and "last published update" in reasons["mal"]


def test_a_large_delta_is_compared_through_its_sketch_within_the_sketch_error():
    gen = torch.Generator().manual_seed(2)
    big = {"a": torch.randn(300_000, generator=gen), "b": torch.randn(70_000, generator=gen)}
    other = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in big.items()}
    exact = float(sum((big[k] * other[k]).sum() for k in big)) / (delta_norm(big) * delta_norm(other))
    first, second = sketch(big), sketch(other)
    assert first.numel() == SKETCH
    estimate = float(first @ second) / float(first.norm() * second.norm())
    assert abs(estimate - exact) < 0.02
    assert copies({"x": first, "y": sketch({k: 2 * v for k, v in big.items()})}, None, {"x": 1.0})
