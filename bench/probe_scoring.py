"""Probe scoring against quiet attackers: honest rejections, attacked loss, and what the probe costs.

    python bench/probe_scoring.py [--rounds 30] [--local-steps 10] [--seeds 1] [--compression SPEC] [--json]

Simulated in one process with crowdtrain's own pieces: charlm (1 layer, width 32) from
``jobs.load_job``, each volunteer trains its own shard with ``volunteer.trainer.train_shard``,
the round's voices are judged by ``coordinator.merging.verification`` (``Prober``, ``judge``,
reputation) exactly as the aggregator does, and FedAvg merges the kept voices weighted by
samples x reputation. Scenarios:

* ``clean-8``: 8 honest volunteers on non-identical shards; the share of honest voices the
  probe rejects (goal: under 2% over 30 rounds).
* ``clean-3``: 3 honest volunteers: the loss an attacked run is compared with.
* ``attacked``: those 3 plus an *ascender* (trains to raise the loss, its delta scaled to
  the honest median norm) and a *negator* (returns its honest delta negated), with and
  without ``--verify probe`` (goal: within 1.1x of ``clean-3``).
* ``attacked-8``: the same two attackers among 6 honest volunteers; ``three attackers``:
  the two plus a free-rider among 3 honest ones (half the voices bad).
* ``free-rider`` and ``random-tokens``: 3 honest plus one volunteer that sends 1e-3 of an
  honest delta, or trains on random bytes; how often each is merged.

The probe's cost is the time spent scoring voices as a fraction of the whole round
(training included), measured in the ``clean-8`` scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging.rules import Evidence, judge  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from coordinator.merging.verification import Consensus, Prober, next_reputation, weigh  # noqa: E402
from coordinator.rounds.validation import delta_norm  # noqa: E402
from jobs import load_job  # noqa: E402
from serialization import loads  # noqa: E402
from tests.fixtures.lying_jobs import Ascending, RandomTokens  # noqa: E402
from volunteer.feedback import ErrorFeedback  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

JOB_ARGS = {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 60, "eval_batches": 4}
Delta = dict[str, torch.Tensor]


def honest(job, weights, shard, shards, args, number, seed) -> Delta:
    return train_shard(
        job,
        weights,
        shard=shard,
        shards=shards,
        steps=args.local_steps,
        lr=3e-3,
        device=torch.device("cpu"),
        seed=seed_for(f"probe-{seed}", number, shard),
    ).delta


def scaled(delta: Delta, norm: float) -> Delta:
    factor = norm / max(delta_norm(delta), 1e-12)
    return {k: v * factor for k, v in delta.items()}


# name -> how a bad volunteer makes its delta (job, weights, shard, shards, args, round, seed, honest norm)
Attack = Callable[..., Delta]
ATTACKS: dict[str, Attack] = {
    "ascender": lambda job, w, i, n, a, r, s, norm: scaled(honest(Ascending(job), w, i, n, a, r, s), norm),
    "negator": lambda job, w, i, n, a, r, s, norm: {k: -v for k, v in honest(job, w, i, n, a, r, s).items()},
    "free-rider": lambda job, w, i, n, a, r, s, norm: {
        k: v * 1e-3 for k, v in honest(job, w, i, n, a, r, s).items()
    },
    "random-tokens": lambda job, w, i, n, a, r, s, norm: honest(RandomTokens(job), w, i, n, a, r, s),
}


def simulate(
    args, honest_count: int, attackers: list[str], verify: bool, seed: int, strategy: str = "fedavg"
) -> dict:
    """One run: final eval loss, rejections per volunteer kind, reputations, probe time share."""
    merger = make_strategy(strategy)
    job = load_job("charlm", {**JOB_ARGS, "seed": seed})
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [f"honest-{i}" for i in range(honest_count)] + attackers
    shards = len(names)
    reputation: dict[str, float | None] = dict.fromkeys(names)
    feedback = {name: ErrorFeedback() for name in names}
    judged = {name: 0 for name in names}
    rejected = {name: 0 for name in names}
    train_s = probe_s = 0.0
    ratios: dict[str, list[float]] = {}
    rounds_gains: list[dict[str, float]] = []
    for number in range(1, args.rounds + 1):
        started = time.perf_counter()
        voices: dict[str, Delta] = {}
        for i, name in enumerate(names[:honest_count]):
            voices[name] = honest(job, weights, i, shards, args, number, seed)
        norm = statistics.median(delta_norm(d) for d in voices.values())
        for i, name in enumerate(attackers, start=honest_count):
            voices[name] = ATTACKS[name](job, weights, i, shards, args, number, seed, norm)
        train_s += time.perf_counter() - started
        if args.compression != "none":  # what the aggregator would decode: each volunteer's error feedback
            voices = {n: loads(feedback[n].encode(d, {}, args.compression))[0] for n, d in voices.items()}
        kept = dict(voices)
        if verify:
            started = time.perf_counter()
            prober = Prober(job, weights)
            share = 1.0 / len(voices)  # as the aggregator probes: each voice's share of the merge
            gains = {name: prober.gain(delta, share) for name, delta in voices.items()}
            consensus = Consensus()
            for name, delta in voices.items():
                consensus.add(delta, weigh(1.0, reputation[name]))
            evidence = {
                name: Evidence(
                    gains[name], delta_norm(delta), consensus.agreement(delta, weigh(1.0, reputation[name]))
                )
                for name, delta in voices.items()
            }
            reasons = judge(evidence, partial(probe_cost, prober, voices, share, gains))
            rounds_gains.append(gains)
            for name, gain in gains.items():
                typical = statistics.median(g for n, g in gains.items() if n != name)
                if typical > 0:
                    kind = "honest" if name.startswith("honest") else name
                    ratios.setdefault(kind, []).append(gain / typical)
            probe_s += time.perf_counter() - started
            for name in voices:
                judged[name] += 1
                rejected[name] += name in reasons
                reputation[name] = next_reputation(reputation[name], name not in reasons)
            kept = {n: d for n, d in voices.items() if n not in reasons}
        if kept:  # as the aggregator merges: samples (equal here) x reputation, through the strategy
            voices_in = [(weigh(1.0, reputation[n]) if verify else 1.0, d) for n, d in kept.items()]
            weights = merger.aggregate({k: v.clone() for k, v in weights.items()}, iter(voices_in))
    model.load_state_dict(weights)
    honest_names = names[:honest_count]
    return {
        "eval_loss": float(job.evaluate(model)["eval_loss"]),
        "honest_rejected": sum(rejected[n] for n in honest_names),
        "honest_judged": sum(judged[n] for n in honest_names),
        "attackers": {n: {"rejected": rejected[n], "reputation": reputation[n]} for n in attackers},
        "min_honest_reputation": min((reputation[n] or 0.5) for n in honest_names),
        "probe_share": probe_s / max(train_s + probe_s, 1e-9),
        "gain_ratios": ratios,
        "gains": rounds_gains,
    }


def probe_cost(prober: Prober, voices: dict[str, Delta], share: float, gains: dict, name: str) -> float:
    """The probe's resolution for one voice's step, as the aggregator measures it when asked."""
    return prober.cost(voices[name], share, gains[name])


def mean_of(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument(
        "--strategies",
        nargs="*",
        default=["median", "trimmed-mean:0.2", "krum:2"],
        help="robust strategies to run the attacked scenario with, beside fedavg",
    )
    p.add_argument(
        "--compression", default="none", help="the uplink codec the voices go through (with error feedback)"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    seeds = range(args.seeds)
    scenarios = {
        "clean-8 (probe)": (8, [], True),
        "clean-3 (no verify)": (3, [], False),
        "clean-3 (probe)": (3, [], True),
        "attacked (no verify)": (3, ["ascender", "negator"], False),
        "attacked (probe)": (3, ["ascender", "negator"], True),
        "attacked-8 (probe)": (6, ["ascender", "negator"], True),
        "three attackers (probe)": (3, ["ascender", "negator", "free-rider"], True),
        "free-rider (probe)": (3, ["free-rider"], True),
        "random-tokens (probe)": (3, ["random-tokens"], True),
    }
    for strategy in args.strategies:
        scenarios[f"attacked, {strategy} (no verify)"] = (3, ["ascender", "negator"], False, strategy)
        scenarios[f"attacked, {strategy} (probe)"] = (3, ["ascender", "negator"], True, strategy)
        scenarios[f"clean-3, {strategy} (no verify)"] = (3, [], False, strategy)
    results = {
        name: [simulate(args, *spec[:3], seed, *spec[3:]) for seed in seeds]
        for name, spec in scenarios.items()
    }

    def clean(name: str) -> float:
        """The clean 3-volunteer loss of the scenario's strategy (fedavg unless named)."""
        strategy = next((x for x in args.strategies if f", {x} " in name), None)
        reference = f"clean-3, {strategy} (no verify)" if strategy else "clean-3 (no verify)"
        return mean_of(results[reference], "eval_loss")

    rows = []
    for name, runs in results.items():
        honest_judged = sum(r["honest_judged"] for r in runs)
        attackers = {}
        for run in runs:
            for who, entry in run["attackers"].items():
                attackers.setdefault(who, []).append(entry)
        rows.append(
            {
                "scenario": name,
                "eval_loss": mean_of(runs, "eval_loss"),
                "vs_clean_3": mean_of(runs, "eval_loss") / clean(name),
                "honest_rejected": sum(r["honest_rejected"] for r in runs),
                "honest_judged": honest_judged,
                "attackers_rejected": {
                    who: f"{sum(e['rejected'] for e in entries)}/{args.rounds * len(entries)}"
                    for who, entries in attackers.items()
                },
                "attacker_reputation": {
                    who: statistics.mean(e["reputation"] or 0.5 for e in entries)
                    for who, entries in attackers.items()
                },
                "min_honest_reputation": mean_of(runs, "min_honest_reputation"),
                "probe_share": mean_of(runs, "probe_share"),
            }
        )
    document = {"rounds": args.rounds, "local_steps": args.local_steps, "seeds": args.seeds, "rows": rows}
    document["seconds"] = round(time.time() - started, 1)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"charlm (1 layer, width 32), {args.rounds} rounds of {args.local_steps} local steps, "
        f"{args.seeds} seed(s), fedavg; {document['seconds']} s\n"
    )
    print(
        "| scenario | eval loss | vs clean-3 | honest rejected | attackers rejected "
        "| attacker reputation | lowest honest reputation | probe time share |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        honest_text = f"{r['honest_rejected']}/{r['honest_judged']}" if r["honest_judged"] else "-"
        caught = ", ".join(f"{who} {text}" for who, text in r["attackers_rejected"].items()) or "-"
        reps = ", ".join(f"{who} {v:.2f}" for who, v in r["attacker_reputation"].items()) or "-"
        share = f"{r['probe_share']:.1%}" if r["honest_judged"] else "-"
        print(
            f"| {r['scenario']} | {r['eval_loss']:.3f} | {r['vs_clean_3']:.3f}x | {honest_text} | {caught} "
            f"| {reps} | {r['min_honest_reputation']:.2f} | {share} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
