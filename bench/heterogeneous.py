"""Volunteers of every speed: wall-clock and samples to a target loss, per way of running rounds.

    python bench/heterogeneous.py [--step-seconds 0.05] [--local-steps 10] [--sync-rounds 8] [--json]

Eight real volunteer processes (one worker each) on a private Redis, slowed by a sleep per
training step of 1, 1, 2, 2, 4, 4, 8 and 8 times ``--step-seconds`` (``bench/slow_charlm.py``),
train charlm (1 layer, width 32). Modes, each on a fresh cluster:

* ``sync``: rounds of 8 shards, all of them awaited (the baseline);
* ``quorum 6/8``: rounds of 8 shards merged once 6 are in (the two slowest are late);
* ``shard-seconds``: rounds of 8 shards, each shard trains for at most the time the fastest
  volunteer needs for ``--local-steps`` (``init --shard-seconds``): slow ones send fewer samples;
* ``async``: ``--mode async --buffer 4``, 8 jobs kept out, ``--max-staleness 8``.

The target is the eval loss synchronous rounds reach after ``--sync-rounds`` rounds; each other
mode runs until a merged version reaches it (or three times the synchronous time). Reported:
wall-clock seconds to the target (from the first post, volunteers already up), merged samples,
the volunteers' idle fraction (1 - their busy time / (8 x wall-clock), from their task logs) and
the discarded fraction of their busy time (training that was never merged).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Cluster
from coordinator.store import Store

JOB = "bench.slow_charlm:make_job"
JOB_ARGS = ["layers=1", "width=32", "heads=2", "context=32", "max_files=60", "eval_batches=4"]
SLOWDOWNS = (1, 1, 2, 2, 4, 4, 8, 8)
_DONE = re.compile(r"^(\S+ \S+) INFO celery\.app\.trace: Task train_shard\[.*\] succeeded in ([0-9.]+)s")


def run_mode(
    name: str, flags: list[str], args: argparse.Namespace, target: float | None, budget: float
) -> dict:
    """One mode on a fresh cluster: seconds and samples until ``target`` (or the sync budget)."""
    with Cluster(f"hetero-{name.split()[0]}") as cluster:
        cluster.aggregator()
        names = []
        for i, slowdown in enumerate(SLOWDOWNS):
            names.append(f"v{i}x{slowdown}")
            cluster.env["CROWDTRAIN_BENCH_STEP_SECONDS"] = str(slowdown * args.step_seconds)
            cluster.volunteer(concurrency=1, name=names[-1], allow=[JOB])
        cluster.env.pop("CROWDTRAIN_BENCH_STEP_SECONDS")
        cluster.wait_for_workers(names, timeout=180)
        job_args = [x for arg in JOB_ARGS for x in ("--job-arg", arg)]
        cluster.coordinator(
            "init", "--run", "h", "--job", JOB, *job_args, "--local-steps", str(args.local_steps),
            "--shards", "8", "--deadline", "600", "--verify", "none", *flags,
        )  # fmt: skip
        store = Store(cluster.client)
        rounds = args.sync_rounds if target is None else 10_000
        started = time.time()
        runner = subprocess.Popen(
            [sys.executable, "-m", "cli.coordinator", "run", "--run", "h", "--rounds", str(rounds), "--json"],
            cwd=cluster.dir, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        reached = None
        try:
            while reached is None and time.time() - started < budget:
                if runner.poll() is not None and target is None:
                    reached = _final(store, started)
                    break
                if target is not None:
                    reached = _first_below(store, target, started)
                time.sleep(0.2)
        finally:
            runner.kill()
        if reached is None:
            reached = {**_final(store, started), "missed": True}
        busy, idle = _busy(cluster.dir, names, started, started + reached["seconds"])
        merged_seconds = sum(
            float((store.redis.hget(f"ct:volunteer:{n}", "train_seconds") or b"0").decode()) for n in names
        )
        return {
            "mode": name,
            **reached,
            "idle_fraction": idle,
            "discarded_fraction": max(0.0, 1 - merged_seconds / busy) if busy else 0.0,
        }


def _records(store: Store) -> list[dict]:
    from coordinator.views.documents import round_record

    return [round_record(store, "h", n) for n in range(1, store.rounds.count("h") + 1)]


def _first_below(store: Store, target: float, started: float) -> dict | None:
    samples = 0
    for record in _records(store):
        if record["status"] != "done":
            continue
        samples += int(record.get("samples") or 0)
        if record["eval_loss"] is not None and record["eval_loss"] <= target:
            return {"seconds": time.time() - started, "samples": samples, "eval_loss": record["eval_loss"],
                    "versions": record["model_version"]}  # fmt: skip
    return None


def _final(store: Store, started: float) -> dict:
    done = [r for r in _records(store) if r["status"] == "done"]
    return {
        "seconds": time.time() - started,
        "samples": sum(int(r.get("samples") or 0) for r in done),
        "eval_loss": done[-1]["eval_loss"] if done else None,
        "versions": done[-1]["model_version"] if done else 0,
    }


def _busy(folder: Path, names: list[str], start: float, end: float) -> tuple[float, float]:
    """Seconds the volunteers trained within [start, end], and their idle fraction of it."""
    busy = 0.0
    for name in names:
        for line in (folder / f"volunteer-{name}.log").read_text(errors="replace").splitlines():
            match = _DONE.match(line)
            if not match:
                continue
            finished = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            took = float(match[2])
            busy += max(0.0, min(finished, end) - max(finished - took, start))
    return busy, 1 - busy / (len(names) * max(end - start, 1e-9))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-seconds", type=float, default=0.05)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--sync-rounds", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sync = run_mode("sync", [], args, None, budget=3600)
    target, budget = sync["eval_loss"], 3 * sync["seconds"]
    fastest = args.local_steps * args.step_seconds
    rows = [sync]
    for name, flags in (
        ("quorum 6/8", ["--quorum", "6"]),
        ("shard-seconds", ["--shard-seconds", f"{fastest:.3f}"]),
        ("async", ["--mode", "async", "--buffer", "4", "--max-staleness", "8"]),
    ):
        rows.append(run_mode(name, flags, args, target, budget))
    for row in rows:
        row["speedup"] = sync["seconds"] / row["seconds"]
    if args.json:
        print(json.dumps({"target_eval_loss": target, "rows": rows}, indent=2))
        return 0
    print(f"target eval loss {target:.4f} (sync after {args.sync_rounds} rounds); slow-downs {SLOWDOWNS}\n")
    print("| mode | seconds to target | vs sync | samples | versions | eval loss | idle | discarded |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mark = " (not reached)" if r.get("missed") else ""
        print(
            f"| {r['mode']} | {r['seconds']:.1f}{mark} | {r['speedup']:.2f}x | {r['samples']} "
            f"| {r['versions']} | {r['eval_loss']:.4f} | {r['idle_fraction']:.0%} "
            f"| {r['discarded_fraction']:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
