"""Utility against privacy: charlm's eval loss after DP-FedAvg runs at epsilon 1, 4, 8 and infinity.

    python bench/privacy_utility.py [--volunteers 8] [--rounds 20] [--local-steps 10] [--seeds 2]

Simulated in one process with crowdtrain's own pieces: the job from ``jobs.load_job``
(charlm, 1 layer, width 32), each volunteer trains its own shard with
``volunteer.trainer.train_shard``, the round's voices go through
``coordinator.merging.privacy.privatize`` (clip each to C, Gaussian noise of std Z*C on the sum,
divide by the voices) and FedAvg applies the mean. For each target epsilon the noise
multiplier Z is the smallest that keeps epsilon after ``--rounds`` rounds (q = 1, delta
1e-5, dp-accounting's RDP accountant via ``coordinator.merging.privacy.epsilon_after``) at the
target. C is the median norm of the non-private run's first-round deltas. "infinity" is
plain FedAvg (no clipping, no noise): the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging.privacy import epsilon_after, privatize  # noqa: E402
from coordinator.rounds.validation import delta_norm  # noqa: E402
from jobs import load_job  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

TARGETS = (1.0, 4.0, 8.0)  # and infinity: plain FedAvg, the baseline
CLIP_FRACTIONS = (1.0, 0.1, 0.01)  # C as a fraction of the median first-round delta norm
DELTA = 1e-5
JOB_ARGS = {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 60, "eval_batches": 4}


def noise_for(target: float, rounds: int) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds (q = 1) is at most ``target``."""
    low, high = 0.05, 500.0
    for _ in range(60):
        mid = (low + high) / 2
        if epsilon_after(rounds, mid, 1.0, DELTA) > target:
            low = mid
        else:
            high = mid
    return high


def simulate(
    args: argparse.Namespace, clip: float | None, noise: float, seed: int
) -> tuple[float, list[float]]:
    """Eval loss after ``--rounds`` rounds, and the first round's delta norms."""
    job = load_job("charlm", {**JOB_ARGS, "seed": seed})
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first_norms: list[float] = []
    for number in range(1, args.rounds + 1):
        deltas = [
            train_shard(
                job,
                weights,
                shard=i,
                shards=args.volunteers,
                steps=args.local_steps,
                lr=3e-3,
                device=torch.device("cpu"),
                seed=seed_for(f"bench-{seed}", number, i),
            ).delta
            for i in range(args.volunteers)
        ]
        if number == 1:
            first_norms = [delta_norm(d) for d in deltas]
        if clip is None:
            mean = {k: sum(d[k] for d in deltas) / len(deltas) for k in deltas[0]}
        else:
            mean, _, _ = privatize(deltas, clip, noise)
        weights = {k: weights[k] + mean[k] if k in mean else weights[k] for k in weights}
    model.load_state_dict(weights)
    return float(job.evaluate(model)["eval_loss"]), first_norms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volunteers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("absl").setLevel(logging.ERROR)  # the accountant's notes on skipped orders
    started = time.time()
    untrained = load_job("charlm", JOB_ARGS)
    initial = float(untrained.evaluate(untrained.build_model())["eval_loss"])
    baseline = [simulate(args, None, 0.0, seed) for seed in range(args.seeds)]
    median_norm = statistics.median(n for _, norms in baseline for n in norms)
    rows = [
        {"epsilon": None, "clip": None, "noise": 0.0, "eval_loss": statistics.mean(x for x, _ in baseline)}
    ]
    for target in TARGETS:
        noise = noise_for(target, args.rounds)
        for fraction in CLIP_FRACTIONS:
            clip = median_norm * fraction
            losses = [simulate(args, clip, noise, seed)[0] for seed in range(args.seeds)]
            rows.append(
                {"epsilon": target, "clip": clip, "noise": noise, "eval_loss": statistics.mean(losses)}
            )
    result = {
        "volunteers": args.volunteers,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "seeds": args.seeds,
        "median_norm": median_norm,
        "delta": DELTA,
        "initial_eval_loss": initial,
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"charlm (1 layer, width 32), {args.volunteers} volunteers, {args.rounds} rounds of "
        f"{args.local_steps} local steps, median first-round delta norm {median_norm:.3g}, "
        f"delta {DELTA:g}, {args.seeds} seeds; initial eval loss {initial:.3f}\n"
    )
    print("| epsilon | clip C | noise multiplier Z | noise std on the mean (Z*C/volunteers) | eval loss |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        if row["epsilon"] is None:
            print(f"| inf (no DP) | - | 0 | 0 | {row['eval_loss']:.3f} |")
            continue
        std = row["noise"] * row["clip"] / args.volunteers
        print(
            f"| {row['epsilon']:g} | {row['clip']:.3g} | {row['noise']:.3g} | {std:.3g} | "
            f"{row['eval_loss']:.3f} |"
        )
    print(f"\n{result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
