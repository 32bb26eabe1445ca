"""Honest work on the job matrix, judged as the aggregator judges it: false rejections and cosines.

    python bench/judging_matrix.py [--rounds 12] [--voices 4] [--jobs linear click mlp charlm gpt]
        [--local-steps 10] [--lr 3e-3] [--optimizer adamw|sgd] [--json]

Simulated in one process with crowdtrain's own pieces: each honest volunteer trains its own shard
with ``volunteer.trainer.train_shard`` (its inner optimizer state kept, as ``--inner-state keep``),
the round's voices go through ``coordinator.merging.verification`` as
``coordinator.merging.judging`` applies it
(``judge`` with the probe's resolution, a lone voice against the last update, ``copies`` through
``sketch``), and FedAvg merges the kept voices. Jobs: ``linear`` (17 parameters, label noise 0.5),
``click`` (131k parameters, zero-initialised sparse), ``mlp`` (tests/fixtures/jobs_small.py),
``charlm`` (1 layer, width 32) and ``gpt`` (nano). Reported per job: honest voices rejected by the
probe and as copies, out of those judged; the largest cosine between two honest voices of a round
and between an honest voice and the last published update (what ``COPY_COSINE`` must stay above);
the lowest agreement of an honest voice with the others (what ``REVERSED`` must stay under); the
eval loss before and after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging.judging import last_update  # noqa: E402
from coordinator.merging.rules import Evidence, judge  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from coordinator.merging.verification import (  # noqa: E402
    Consensus,
    Prober,
    copies,
    lone_resolution,
    next_reputation,
    sketch,
    weigh,
)
from coordinator.rounds.validation import accepted_norm, delta_norm  # noqa: E402
from jobs import load_job  # noqa: E402
from tests.fixtures import jobs_small  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

Delta = dict[str, torch.Tensor]
JOBS: dict[str, Any] = {
    "linear": lambda: jobs_small.linear(noise=0.5),
    "click": lambda: jobs_small.click(),
    "mlp": lambda: jobs_small.mlp(),
    "charlm": lambda: load_job(
        "charlm", {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 60, "eval_batches": 4}
    ),
    "gpt": lambda: load_job("gpt", {"preset": "nano", "max_files": 60, "eval_batches": 4}),
}


def _cosine(a: Delta, b: Delta) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a if a[k].is_floating_point() and k in b)
    return dot / max(delta_norm(a) * delta_norm(b), 1e-30)


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    job = JOBS[name]()
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    initial = float(job.evaluate(_model(job, weights))["eval_loss"])
    merger = make_strategy("fedavg")
    names = [f"h{i}" for i in range(args.voices)]
    reputation: dict[str, float | None] = dict.fromkeys(names)
    state: dict[str, Any] = dict.fromkeys(names)
    history: list[float] = []
    previous: Delta | None = None
    probe_rejected = copy_rejected = judged = 0
    pair_max = last_max = -1.0
    agreement_min = 1.0
    started = time.time()
    for number in range(1, args.rounds + 1):
        voices: dict[str, Delta] = {}
        for i, who in enumerate(names):
            result = train_shard(
                job,
                weights,
                shard=i,
                shards=len(names),
                steps=args.local_steps,
                lr=args.lr,
                optimizer=args.optimizer,
                device=torch.device("cpu"),
                seed=seed_for(f"matrix-{name}" + (f"-{args.seed}" if args.seed else ""), number, i),
                optimizer_state=state[who],
            )
            state[who], voices[who] = result.optimizer_state, result.delta
        for a, b in itertools.combinations(voices.values(), 2):
            pair_max = max(pair_max, _cosine(a, b))
        last = last_update(weights, previous) if previous is not None else None
        if last is not None:
            last_max = max(last_max, *(_cosine(d, last) for d in voices.values()))
        # as coordinator.merging.judging.probe_voices and aggregator._judge do
        prober = Prober(job, weights)
        share = 1.0 / len(voices)
        gains = {who: prober.gain(d, share) for who, d in voices.items()}
        consensus = Consensus()  # between the voices' sketches, as probe_voices measures it
        drawn = {who: {"sketch": sketch(d)} for who, d in voices.items()}
        for who in voices:
            consensus.add(drawn[who], weigh(1.0, reputation[who]))
        evidence = {
            who: Evidence(
                gains[who], delta_norm(d), consensus.agreement(drawn[who], weigh(1.0, reputation[who]))
            )
            for who, d in voices.items()
        }
        if len(voices) > 1:
            agreement_min = min(agreement_min, *(e.agreement for e in evidence.values()))
        usual = statistics.median(history) if history else None
        lone = None
        if len(voices) == 1:
            ((who, d),) = voices.items()
            lone = lone_resolution(prober, d, gains[who], usual, last)
        reasons = judge(evidence, partial(_cost, prober, voices, share, gains), lone)
        copied = copies(
            {who: sketch(d) for who, d in voices.items()},
            sketch(last) if last is not None else None,
            reputation,
        )
        judged += len(voices)
        if args.verbose and (reasons or copied):
            costs = {who: _cost(prober, voices, share, gains, who) for who in voices}
            shown = {
                who: (round(e.gain, 5), round(e.norm, 4), round(e.agreement, 2))
                for who, e in evidence.items()
            }
            print(f"{name} round {number}: {shown} costs {costs} -> {reasons} {copied}", file=sys.stderr)
        copy_rejected += len(copied)
        probe_rejected += len(set(reasons) - set(copied))
        kept = {who: d for who, d in voices.items() if who not in reasons and who not in copied}
        for who in voices:
            reputation[who] = next_reputation(reputation[who], who in kept)
        if kept:
            norm = accepted_norm(delta_norm(d) for d in kept.values())
            if norm is not None:
                history = [norm, *history][:16]
            previous = weights
            weights = merger.aggregate(
                {k: v.clone() for k, v in weights.items()},
                iter([(weigh(1.0, reputation[who]), d) for who, d in kept.items()]),
            )
    final = float(job.evaluate(_model(job, weights))["eval_loss"])
    return {
        "job": name,
        "judged": judged,
        "probe_rejected": probe_rejected,
        "copy_rejected": copy_rejected,
        "pair_cosine_max": pair_max,
        "last_update_cosine_max": last_max,
        "agreement_min": agreement_min,
        "initial_loss": initial,
        "final_loss": final,
        "seconds": round(time.time() - started, 1),
    }


def _cost(prober: Prober, voices: dict[str, Delta], share: float, gains: dict[str, float], who: str) -> float:
    return prober.cost(voices[who], share, gains[who])


def _model(job: Any, weights: Delta) -> torch.nn.Module:
    model = job.build_model()
    model.load_state_dict(weights)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--voices", type=int, default=4)
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--seed", type=int, default=0, help="another draw of every shard's batches (0: the first)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true", help="each rejection's evidence, on stderr")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [run(name, args) for name in args.jobs]
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return 0
    print(
        f"{args.voices} honest volunteers, {args.rounds} rounds of {args.local_steps} {args.optimizer} steps "
        f"at lr {args.lr}, fedavg\n"
    )
    print(
        "| job | probe rejected | copy rejected | max cosine, two voices | max cosine, last update "
        "| min agreement | loss |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['job']} | {r['probe_rejected']}/{r['judged']} | {r['copy_rejected']}/{r['judged']} "
            f"| {r['pair_cosine_max']:.3f} | {r['last_update_cosine_max']:.3f} | {r['agreement_min']:.2f} "
            f"| {r['initial_loss']:.3f} -> {r['final_loss']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
