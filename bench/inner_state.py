"""Inner optimizer state across rounds (``init --inner-state keep|reset``): loss at equal samples.

    python bench/inner_state.py [--rounds 30] [--local-steps 20] [--volunteers 4] [--seeds 3] [--json]

Simulated in one process with crowdtrain's own pieces: charlm (1 layer, width 32), each of
``--volunteers`` volunteers trains its own shard every round with ``volunteer.trainer.train_shard``
(AdamW, lr 3e-3) from the global model, and the strategy merges the deltas. With ``keep`` each
volunteer's AdamW starts from the moments and step count its previous shard left (as the volunteer
process keeps them per run); with ``reset`` from zero, as before. Reported: the final eval loss,
mean over seeds, for FedAvg and DiLoCo (outer Nesterov, lr 0.7, momentum 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coordinator.merging.strategies import make_strategy
from jobs import load_job
from volunteer.trainer import seed_for, train_shard

JOB_ARGS = {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 60, "eval_batches": 4}


def simulate(args: argparse.Namespace, strategy: str, keep: bool, seed: int) -> float:
    """Final eval loss of one simulated run."""
    job = load_job("charlm", {**JOB_ARGS, "seed": seed})
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merger = make_strategy(strategy)
    states: dict[int, dict | None] = dict.fromkeys(range(args.volunteers))
    for number in range(1, args.rounds + 1):
        deltas = []
        for volunteer in range(args.volunteers):
            result = train_shard(
                job,
                weights,
                shard=volunteer,
                shards=args.volunteers,
                steps=args.local_steps,
                lr=3e-3,
                device=torch.device("cpu"),
                seed=seed_for(f"inner-{seed}", number, volunteer),
                optimizer_state=states[volunteer] if keep else None,
            )
            states[volunteer] = result.optimizer_state
            deltas.append((float(result.samples), result.delta))
        weights = merger.aggregate({k: v.clone() for k, v in weights.items()}, iter(deltas))
    model.load_state_dict(weights)
    return float(job.evaluate(model)["eval_loss"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--volunteers", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    rows = []
    for strategy in ("fedavg", "diloco"):
        losses = {
            mode: [simulate(args, strategy, mode == "keep", s) for s in range(args.seeds)]
            for mode in ("reset", "keep")
        }
        rows.append(
            {
                "strategy": strategy,
                "reset": statistics.mean(losses["reset"]),
                "keep": statistics.mean(losses["keep"]),
                "keep_per_seed": losses["keep"],
                "reset_per_seed": losses["reset"],
            }
        )
    document = {**vars(args), "rows": rows, "seconds": round(time.time() - started, 1)}
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"charlm (1 layer, width 32), {args.volunteers} volunteers, {args.rounds} rounds of "
        f"{args.local_steps} local AdamW steps, {args.seeds} seeds; {document['seconds']} s\n"
    )
    print("| strategy | eval loss, reset | eval loss, keep | keep / reset |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['strategy']} | {r['reset']:.4f} | {r['keep']:.4f} | {r['keep'] / r['reset']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
