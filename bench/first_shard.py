"""A volunteer's first shard against its second, in a fresh forked child, with and without ``Preload``.

    nice -n 19 python bench/first_shard.py [--trials 5] [--job tests.fixtures.jobs_tiny:make_job] [--json]

Each trial is a fresh Python process that does what a volunteer's main process does before its
prefork pool forks: it imports ``tasks.training`` (torch, Celery, the volunteer side). With
``Preload`` ("after") it then makes the worker bootstep ``tasks.training.Preload``, which imports
``torch._dynamo`` (``volunteer.trainer.preload``); without it ("before") it does not, as before
the bootstep existed. It then forks one child, as the prefork pool does, which trains two shards
of the job (``volunteer.trainer.train_shard``: build, load, AdamW, 2 local steps, the delta) and
reports each one's wall time. The first shard of a child without ``Preload`` imports
``torch._dynamo`` (the optimizer's ``add_param_group`` is wrapped in ``torch._disable_dynamo``).

Trials alternate (before, after, before, ...); the table reports medians and the first shard's
cost over the second's. ``preload`` is the main process's one-off cost of the bootstep, paid
once per worker before it takes a shard; ``parent rss`` is the main process's RSS at the fork.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import TINY_JOB, median, rss_kib

STEPS = 2


def trial(preload: bool, job_name: str) -> dict[str, float]:
    """One fresh volunteer main process: import, maybe ``Preload``, fork; the child's two shards."""
    import torch

    import tasks.training  # what the volunteer's main process has imported when its pool forks

    began = time.perf_counter()
    if preload:
        tasks.training.Preload(None)  # the bootstep itself, as the worker makes it
    preload_s = time.perf_counter() - began
    parent_rss = rss_kib(os.getpid())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the pool's child
        os.close(read)
        from jobs import load_job
        from volunteer.trainer import train_shard

        job = load_job(job_name, {}, allowed=frozenset([job_name]))
        weights = job.build_model().state_dict()
        shards = []
        for shard in range(2):
            started = time.perf_counter()
            train_shard(
                job,
                weights,
                shard=shard,
                shards=2,
                steps=STEPS,
                lr=1e-3,
                device=torch.device("cpu"),
                seed=shard,
            )
            shards.append(time.perf_counter() - started)
        os.write(write, json.dumps({"first": shards[0], "second": shards[1]}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return {**child, "preload": preload_s, "parent_rss_mib": parent_rss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="fresh processes per side")
    parser.add_argument("--job", default=TINY_JOB, help="the job whose shards are trained")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--trial", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial == "after", args.job)))
        return 0
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.trials):
        for side in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--trial", side, "--job", args.job],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    result: dict[str, dict[str, float]] = {}
    for side, rows in runs.items():
        first = median([r["first"] for r in rows])
        second = median([r["second"] for r in rows])
        result[side] = {
            "first_shard_s": round(first, 4),
            "second_shard_s": round(second, 4),
            "first_minus_second_s": round(first - second, 4),
            "preload_s": round(median([r["preload"] for r in rows]), 4),
            "parent_rss_mib": round(median([r["parent_rss_mib"] for r in rows]), 1),
        }
    result["ratio"] = {
        "first_shard_before_over_after": round(
            result["before"]["first_shard_s"] / result["after"]["first_shard_s"], 1
        )
    }
    if args.json:
        print(json.dumps({"job": args.job, "trials": args.trials, **result}, indent=2))
        return 0
    print(f"job {args.job}, {STEPS} local steps, {args.trials} fresh processes per side (medians)")
    head = ("1st shard s", "2nd shard s", "1st - 2nd s")
    print(f"{'':8} " + " ".join(f"{h:>12}" for h in head) + f" {'preload s':>10} {'parent MiB':>11}")
    for side in ("before", "after"):
        r = result[side]
        print(
            f"{side:8} {r['first_shard_s']:12.4f} {r['second_shard_s']:12.4f} "
            f"{r['first_minus_second_s']:12.4f} {r['preload_s']:10.4f} {r['parent_rss_mib']:11.1f}"
        )
    print(f"first shard, before / after: {result['ratio']['first_shard_before_over_after']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
