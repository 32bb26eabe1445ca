"""A volunteer's time per shard with its model reused (``reuse_model``) against a build per shard.

Usage::

    python bench/model_reuse.py [--jobs gpt:micro,gpt:small,charlm] [--shards 5] [--steps 1]

A job that declares ``reuse_model = True`` (charlm and gpt do) lets a volunteer process
load each shard's weights into the model it trained last; otherwise every shard builds
the model, a random initialisation thrown away at once by ``load_state_dict``. For each
job, ``--shards`` shards are trained with ``volunteer.trainer.train_shard`` on the CPU in
this process, both ways in alternating order, from the same weights and seeds; seconds
are the whole ``train_shard`` call (build or load, the steps, the delta). The first shard
of each way is a warm-up and not counted. Medians; the ratio is reuse over build.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs import load_job
from volunteer.trainer import train_shard

TEXT = "the quick brown fox jumps over the lazy dog; a volunteer trains its shard. " * 2000


def job_args(spec: str, corpus: str) -> tuple[str, dict[str, object]]:
    name, _, preset = spec.partition(":")
    args: dict[str, object] = {"corpus": corpus, "batch_size": 2}
    if preset:
        args["preset"] = preset
    return name, args


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", default="gpt:micro,gpt:small,charlm", help="JOB[:preset], comma-separated")
    parser.add_argument("--shards", type=int, default=5, help="shards per way, the first a warm-up")
    parser.add_argument("--steps", type=int, default=1, help="local steps per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        corpus.write_text(TEXT)
        print(
            f"Model reuse bench: {args.shards} shards per way (first one a warm-up), "
            f"{args.steps} local step(s), CPU, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} cores. Seconds per shard: median (min-max).\n"
        )
        print("| job | parameters | build per shard s | reused model s | reused / built |")
        print("|---|---:|---:|---:|---:|")
        for spec in args.jobs.split(","):
            name, kwargs = job_args(spec, str(corpus))
            job = load_job(name, kwargs)
            weights = {k: v.clone() for k, v in job.build_model().state_dict().items()}
            params = sum(v.numel() for v in weights.values() if v.is_floating_point())
            kept = job.build_model()
            times: dict[str, list[float]] = {"build": [], "reuse": []}
            for n in range(args.shards):
                ways = [("build", None), ("reuse", kept)]
                for way, model in ways if n % 2 == 0 else ways[::-1]:
                    began = time.perf_counter()
                    train_shard(
                        job,
                        weights,
                        shard=n,
                        shards=args.shards,
                        steps=args.steps,
                        lr=1e-3,
                        device=torch.device("cpu"),
                        seed=n,
                        model=model,
                    )
                    if n:
                        times[way].append(time.perf_counter() - began)
            built, reused = median(times["build"]), median(times["reuse"])
            span = {w: f"{min(v):.3f}-{max(v):.3f}" for w, v in times.items()}
            print(
                f"| {spec} | {params / 1e6:.1f}M | {built:.3f} ({span['build']}) | "
                f"{reused:.3f} ({span['reuse']}) | **{reused / built:.2f}x** |"
            )


if __name__ == "__main__":
    main()
