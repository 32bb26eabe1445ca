"""Is training on the assigned data visible in the loss? Gauntlet's check, per shard, on the job matrix.

    python bench/assigned_data.py [--jobs charlm mlp linear click gpt] [--rounds 5] [--volunteers 5] [--json]

A cheaper work check than a replay would compare how much a delta lowers the loss on the
batches its shard was assigned (``seed_for(run, round, shard)``, as ``coordinator.merging.work``
replays them) with how much it lowers it on batches of another shard: training on the assigned
data should favour them. For each job, round and volunteer (10 local AdamW steps, lr 3e-3, the
honest deltas merged by FedAvg between rounds) this measures that *advantage*, the assigned
batches' loss drop minus the other batches' drop, for the honest delta and for the same shard
trained on another shard's batches (``other data``), with one step, and with half the steps.
A check that rejects below a threshold works only if the honest advantages sit above every
other-data advantage. The cost is four forward passes over the shard's batches (before and
after, assigned and other): more than a third of the shard's training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.work_matrix import JOBS  # noqa: E402  (the job matrix, as the work check's tolerance was measured)
from coordinator.merging import work  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

STEPS, LR = 10, 3e-3
KINDS = ("honest", "other data", "lazy 1", "lazy H/2")


def batches(job: Any, shard: int, shards: int, seed: int) -> list[Any]:
    """The batches a shard trains from ``seed``, as the replay draws them."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        drawn = work._cycle(job, shard % shards, shards)
        return [next(drawn) for _ in range(STEPS)]


def mean_loss(job: Any, model: torch.nn.Module, chosen: list[Any]) -> float:
    with torch.no_grad():
        return sum(float(job.loss(model, b)) for b in chosen) / len(chosen)


def advantage(job: Any, base: dict, delta: dict, assigned: list[Any], other: list[Any]) -> float:
    """The assigned batches' loss drop minus the other batches' drop when ``delta`` is applied."""
    model = job.build_model()
    model.load_state_dict(base)
    model.eval()
    before = mean_loss(job, model, assigned), mean_loss(job, model, other)
    model.load_state_dict({k: base[k] + delta[k] if k in delta else base[k] for k in base})
    after = mean_loss(job, model, assigned), mean_loss(job, model, other)
    return (before[0] - after[0]) - (before[1] - after[1])


def run(name: str, rounds: int, shards: int) -> dict[str, list[float]]:
    job = JOBS[name]()
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    merger = make_strategy("fedavg")
    found: dict[str, list[float]] = {kind: [] for kind in KINDS}

    def trained(shard: int, steps: int, seed: int) -> dict:
        cpu = torch.device("cpu")
        return train_shard(
            job, weights, shard=shard, shards=shards, steps=steps, lr=LR, device=cpu, seed=seed
        ).delta

    for number in range(1, rounds + 1):
        honest = []
        for i in range(shards):
            seed = seed_for(name, number, i)
            assigned = batches(job, i, shards, seed)
            other = batches(job, (i + 2) % shards, shards, seed_for(name, number + 100, i))
            deltas = {
                "honest": trained(i, STEPS, seed),
                "other data": trained((i + 1) % shards, STEPS, seed_for(name, number + 1000, i)),
                "lazy 1": trained(i, 1, seed),
                "lazy H/2": trained(i, STEPS // 2, seed),
            }
            honest.append(deltas["honest"])
            for kind, delta in deltas.items():
                found[kind].append(advantage(job, weights, delta, assigned, other))
        weights = merger.aggregate(dict(weights), iter([(1.0, d) for d in honest]), copy=True)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--volunteers", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for name in args.jobs:
        found = run(name, args.rounds, args.volunteers)
        honest_floor = min(found["honest"])
        rows[name] = {
            kind: {
                "min": round(min(values), 4),
                "median": round(statistics.median(values), 4),
                "max": round(max(values), 4),
                "above_honest_floor": sum(v >= honest_floor for v in values),
                "of": len(values),
            }
            for kind, values in found.items()
        }
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        "| job | "
        + " | ".join(f"{k}: min / median / max (at or above the honest minimum)" for k in KINDS)
        + " |"
    )
    print("| --- |" + " --- |" * len(KINDS))
    for name, row in rows.items():
        cells = [
            f"{r['min']} / {r['median']} / {r['max']} ({r['above_honest_floor']} of {r['of']})"
            for r in row.values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
