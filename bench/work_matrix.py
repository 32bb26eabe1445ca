"""The work check's tolerance on the job matrix: honest replays against lazy and wrong-data deltas.

    python bench/work_matrix.py [--rounds 3] [--volunteers 3] [--compression SPEC] [--json]

For each job of the matrix (the 17-parameter linear regression, the zero-initialised click
model, an MLP, charlm, gpt nano) and each round, every volunteer trains its shard with
``volunteer.trainer.train_shard`` on 2 CPU threads and uploads through its ``ErrorFeedback``
in the run's codec (default ``init``'s); the trusted side replays the shard with
``coordinator.merging.work.replay`` on 1 thread and measures ``coordinator.merging.work.similarity``. The
same is measured for the same shard trained with half the steps, one step, and on another
shard's batches. A row passes when every honest shard is within the tolerance
(``WORK_COSINE``, ``WORK_NORM_RATIO``) and every cheat outside it. ``size``: each upload's norm
over the median of the round's other honest uploads, as ``coordinator.merging.work.short``
compares them (``LAZY_NORM``), and ``dense`` the same on ``work.dense_norm``. ``turned lazy H/2``
is a veteran that turns lazy this round: half the steps through its honest past's error feedback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging import work  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from coordinator.rounds.validation import delta_norm  # noqa: E402
from jobs import load_job  # noqa: E402
from serialization import loads  # noqa: E402
from tests.fixtures import jobs_small  # noqa: E402
from volunteer import trainer  # noqa: E402
from volunteer.feedback import ErrorFeedback  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

STEPS, LR = 10, 3e-3
JOBS: dict[str, Any] = {
    "linear": lambda: jobs_small.linear(noise=0.5),
    "click": lambda: jobs_small.click(),
    "mlp": lambda: jobs_small.mlp(),
    "charlm": lambda: load_job(
        "charlm", {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 60, "eval_batches": 4}
    ),
    "gpt": lambda: load_job("gpt", {"preset": "nano", "max_files": 60, "eval_batches": 4}),
}
KINDS = ("honest", "lazy H/2", "lazy 1", "other data", "turned lazy H/2")
FP32 = "honest, float32 replay"  # with --bf16: the honest shard against a replay without autocast


@contextlib.contextmanager
def _volunteer_autocast(bf16: bool) -> Iterator[None]:
    """With ``bf16`` the volunteer trains under the CPU's bfloat16 autocast, as a CUDA one does
    under CUDA's (``volunteer.trainer._autocast``): the nearest this machine comes to a GPU's numbers."""
    if not bf16:
        yield
        return
    saved = trainer._autocast
    trainer._autocast = lambda device: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    try:
        yield
    finally:
        trainer._autocast = saved


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    job = JOBS[name]()
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    merger = make_strategy("fedavg")
    feedback = {(kind, i): ErrorFeedback() for kind in KINDS for i in range(args.volunteers)}
    seen: dict[str, list[tuple[float, float]]] = {kind: [] for kind in (*KINDS, FP32)}
    sizes: dict[str, list[float]] = {kind: [] for kind in KINDS}  # upload norm / honest others' median
    dense: dict[str, list[float]] = {kind: [] for kind in KINDS}  # the same on ``work.dense_norm``
    shards = args.volunteers
    for number in range(1, args.rounds + 1):
        honest = []
        norms: dict[str, list[float]] = {kind: [] for kind in KINDS}
        dense_norms: dict[str, list[float | None]] = {kind: [] for kind in KINDS}
        for i in range(shards):
            past = copy.deepcopy(feedback[("honest", i)])  # a veteran turning lazy: its honest residual
            seed = seed_for(name, number, i)
            torch.set_num_threads(1)
            replay = partial(
                work.replay, job, weights, shard=i, shards=shards, steps=STEPS, lr=LR, optimizer="adamw"
            )
            replayed, _ = replay(seed=seed, bf16=args.bf16)  # as check_work replays a CUDA volunteer's
            full, _ = replay(seed=seed) if args.bf16 else (replayed, 0)
            torch.set_num_threads(2)
            for kind in KINDS:
                steps = {"lazy H/2": STEPS // 2, "lazy 1": 1, "turned lazy H/2": STEPS // 2}.get(kind, STEPS)
                other = kind == "other data"
                shard, drawn = ((i + 1) % shards, seed_for(name, number + 1000, i)) if other else (i, seed)
                with _volunteer_autocast(args.bf16):
                    trained = train_shard(
                        job, weights, shard=shard, shards=shards, steps=steps, lr=LR,
                        device=torch.device("cpu"), seed=drawn,
                    ).delta  # fmt: skip
                if kind == "honest":
                    honest.append({k: v.clone() for k, v in trained.items()})
                encoder = past if kind == "turned lazy H/2" else feedback[(kind, i)]
                blob = encoder.encode(trained, {}, args.compression)
                norms[kind].append(delta_norm(loads(blob)[0]))
                dense_norms[kind].append(work.dense_norm(loads(blob)[0], args.compression))
                measured = work.similarity(loads(blob)[0], replayed, args.compression)
                if measured is not None:
                    seen[kind].append(measured)
                if kind == "honest" and args.bf16:  # what a float32 replay makes of the same shard
                    against_full = work.similarity(loads(blob)[0], full, args.compression)
                    if against_full is not None:
                        seen[FP32].append(against_full)
        weights = merger.aggregate(dict(weights), iter([(1.0, d) for d in honest]), copy=True)
        for kind in KINDS:  # as the round's intake sees each upload: against the honest others' median
            for i, size in enumerate(norms[kind]):
                usual = statistics.median(n for j, n in enumerate(norms["honest"]) if j != i)
                sizes[kind].append(size / max(usual, 1e-30))
            for i, size in enumerate(dense_norms[kind]):
                peers = [n for j, n in enumerate(dense_norms["honest"]) if j != i and n is not None]
                if size is not None and peers:
                    dense[kind].append(size / max(statistics.median(peers), 1e-30))

    def within(pair: tuple[float, float]) -> bool:
        cosine, ratio = pair
        return cosine >= work.WORK_COSINE and 1 / work.WORK_NORM_RATIO <= ratio <= work.WORK_NORM_RATIO

    row: dict[str, Any] = {}
    for kind, pairs in seen.items():
        row[kind] = {
            "shards": len(pairs),
            "cosine": [round(min(c for c, _ in pairs), 6), round(max(c for c, _ in pairs), 6)]
            if pairs
            else None,
            "norm": [round(min(r for _, r in pairs), 4), round(max(r for _, r in pairs), 4)]
            if pairs
            else None,
            "within": sum(within(p) for p in pairs),
            "size": [round(min(sizes[kind]), 3), round(max(sizes[kind]), 3)] if sizes.get(kind) else None,
            "dense": [round(min(dense[kind]), 3), round(max(dense[kind]), 3)] if dense.get(kind) else None,
        }
    row["max_abs_log_norm_honest"] = max((abs(math.log(r)) for _, r in seen["honest"]), default=None)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--volunteers", type=int, default=3)
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--compression", default="topk:0.01+int2@4096")
    p.add_argument("--bf16", action="store_true", help="volunteers train under bf16 autocast, as on CUDA")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = {}
    for name in args.jobs:
        rows[name] = run(name, args)
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    shown = (*KINDS, FP32) if args.bf16 else KINDS
    print("| job | " + " | ".join(f"{k}: cosine, norm ratio (within / shards)" for k in shown) + " |")
    print("| --- |" + " --- |" * len(shown))
    for name, row in rows.items():
        cells = [
            f"{row[k]['cosine']}, {row[k]['norm']} ({row[k]['within']} / {row[k]['shards']})"
            if row[k]["shards"] else "nothing compared"
            for k in shown
        ]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
