"""Scale: one round of 1,000 shards, 8 worker threads: round time, Redis and aggregator memory.

    python bench/scale.py [--shards 1000] [--threads 8] [--features 4096]

A private redis-server, ``coordinator aggregator`` and one volunteer on Celery's thread pool
(``bench/thread_volunteer.py``, ``-P threads -c 8``). The job is the tiny linear model of
``tests/fixtures/jobs_tiny.py`` with ``features`` inputs (4096: a 16 kB float32 delta), one
local step. A 16-shard warm-up round loads the job everywhere first, so the baselines are
taken with every process warm.

Measured: round time (post to new model version, polled every 10 ms); Redis
``used_memory_peak`` (the server is fresh, so its peak is this run's) against the round's
blob bytes (the sum of the uploads); the aggregator's peak RSS (``VmHWM``) against its RSS
before the round; and what the round left in Redis once done: every key it created is
either deleted (uploads) or carries a TTL (task results, round bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import TINY_JOB, Cluster, redis_memory, rss_kib


def key_groups(client, keys: set[bytes]) -> dict[str, dict]:
    """Keys grouped by kind: count, bytes (MEMORY USAGE), how many have no TTL."""
    groups: dict[str, dict] = defaultdict(lambda: {"keys": 0, "bytes": 0, "no_ttl": 0, "max_ttl": 0})
    for key in keys:
        name = key.decode(errors="replace")
        if name.startswith("celery-task-meta-"):
            kind = "celery task results"
        elif ":upload:" in name:
            kind = "uploads (delta blobs)"
        elif ":round:" in name:
            kind = "round bookkeeping"
        elif ":model:" in name or ":staged:" in name:
            kind = "model versions"
        else:
            kind = name if len(name) < 40 else name[:40] + "..."
        g = groups[kind]
        g["keys"] += 1
        g["bytes"] += int(client.memory_usage(key) or 0)
        ttl = client.ttl(key)
        if ttl == -1:
            g["no_ttl"] += 1
        g["max_ttl"] = max(g["max_ttl"], ttl)
    return dict(groups)


def measure(shards: int, threads: int, features: int) -> dict:
    import redis

    from broker.settings import Settings
    from coordinator.rounds.posting import post_round
    from coordinator.store import Store
    from tasks.app import make_app

    with Cluster("scale") as c:
        agg = c.aggregator()
        c.start(
            [
                "bench/thread_volunteer.py",
                "--broker",
                c.url,
                "--threads",
                str(threads),
                "--name",
                "bench-threads",
                "--allow-job",
                TINY_JOB,
            ],
            "volunteer.log",
        )
        c.wait_for_workers(["bench-threads", "bench-agg"])
        c.coordinator(
            "init",
            "--run",
            "scale",
            "--job",
            TINY_JOB,
            "--job-arg",
            f"features={features}",
            "--local-steps",
            "1",
            "--json",
        )
        client = redis.Redis.from_url(c.url)
        store = Store(client)
        app = make_app(Settings(broker_url=c.url))

        def one_round(n: int) -> tuple[float, int]:
            before = store.version("scale")
            started = time.perf_counter()
            info = post_round(store, app, "scale", n, n, 600.0)
            posted = time.perf_counter() - started
            while store.version("scale") == before:
                if store.rounds.status("scale", info["round"]) == "failed":
                    raise RuntimeError("round failed")
                time.sleep(0.01)
            return time.perf_counter() - started, posted, info["round"]

        one_round(16)  # warm-up: job loaded in the aggregator and the volunteer
        time.sleep(1.0)
        keys_before = set(client.scan_iter(count=1000))
        mem_before = redis_memory(client)
        agg_rss_before = rss_kib(agg.pid)
        agg_hwm_before = rss_kib(agg.pid, "VmHWM")
        seconds, posted, number = one_round(shards)
        agg_hwm = rss_kib(agg.pid, "VmHWM")
        time.sleep(1.0)
        info = store.rounds.info("scale", number) or {}
        summary = json.loads(info.get("summary", "{}"))
        mem_after = redis_memory(client)
        new_keys = set(client.scan_iter(count=1000)) - keys_before
        groups = key_groups(client, new_keys)
        return {
            "shards": shards,
            "threads": threads,
            "features": features,
            "accepted": summary.get("accepted"),
            "round_seconds": seconds,
            "post_seconds": posted,
            "uplink_bytes": int(info.get("uplink_bytes", 0)),
            "model_bytes": len(store.model_blob("scale", store.version("scale"))),
            "redis_used_before": mem_before["used"],
            "redis_peak": mem_after["peak"],
            "redis_peak_before": mem_before["peak"],
            "redis_used_after": mem_after["used"],
            "agg_rss_before_kib": agg_rss_before,
            "agg_hwm_before_kib": agg_hwm_before,
            "agg_hwm_kib": agg_hwm,
            "new_keys": groups,
            "model_ttl": client.ttl(f"ct:run:scale:model:{store.version('scale')}"),
        }


def report(r: dict) -> str:
    mib = 1 << 20
    blobs = r["uplink_bytes"]
    peak_growth = r["redis_peak"] - r["redis_used_before"]
    left = r["redis_used_after"] - r["redis_used_before"]
    agg_growth = (r["agg_hwm_kib"] - r["agg_rss_before_kib"]) * 1024
    ttl = r["model_ttl"]
    # the current model version must not expire (checked on its own below): not counted here
    no_ttl = sum(g["no_ttl"] for g in r["new_keys"].values()) - (1 if ttl == -1 else 0)
    model_ttl = "MET" if ttl == -1 else f"NOT MET (it expires in {ttl} s)"
    lines = [
        f"### Scale: one round of {r['shards']} shards, 1 volunteer with {r['threads']} worker "
        f"threads (`-P threads`), tiny linear job ({r['features']} features: "
        f"{r['model_bytes'] / 1e3:.1f} kB model, {blobs / max(1, r['shards']) / 1e3:.1f} kB "
        f"per delta)",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| round time, post to new version | {r['round_seconds']:.2f} s "
        f"({1000 * r['round_seconds'] / r['shards']:.1f} ms/shard, "
        f"{r['shards'] / r['round_seconds']:.0f} shards/s) |",
        f"| of which posting {r['shards']} tasks | {r['post_seconds']:.2f} s |",
        f"| accepted deltas | {r['accepted']} / {r['shards']} |",
        f"| delta blobs uploaded (sum) | {blobs / mib:.1f} MiB |",
        f"| Redis used_memory before the round | {r['redis_used_before'] / mib:.1f} MiB |",
        f"| Redis used_memory_peak | {r['redis_peak'] / mib:.1f} MiB "
        f"(+{peak_growth / mib:.1f} MiB = {peak_growth / max(1, blobs):.2f}x the blobs) |",
        f"| Redis used_memory after the round | {r['redis_used_after'] / mib:.1f} MiB "
        f"(+{left / mib:.2f} MiB, {'all with a TTL' if no_ttl == 0 else f'{no_ttl} keys without TTL'}) |",
        f"| aggregator RSS before / peak (VmHWM) | {r['agg_rss_before_kib'] / 1024:.0f} / "
        f"{r['agg_hwm_kib'] / 1024:.0f} MiB (+{agg_growth / mib:.1f} MiB = "
        f"{agg_growth / max(1, blobs):.2f}x the blobs) |",
        "",
        "Keys the round left in Redis (uploads are deleted after aggregation):",
        "",
        "| kind | keys | MiB | without TTL | TTL up to |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, g in sorted(r["new_keys"].items()):
        lines.append(
            f"| {kind} | {g['keys']} | {g['bytes'] / mib:.2f} | {g['no_ttl']} | {_ttl(g['max_ttl'])} |"
        )
    lines += [
        "",
        "Goals:",
        f"- Redis peak growth {peak_growth / max(1, blobs):.2f}x the round's blobs "
        f"(goal: not beyond the blobs plus small per-task records) "
        f"{'MET' if peak_growth <= 1.5 * blobs + 4 * mib else 'NOT MET'}",
        f"- aggregator peak RSS growth {agg_growth / mib:.1f} MiB for {blobs / mib:.1f} MiB of "
        f"deltas (goal: O(model), not O(shards x model)) "
        f"{'MET' if agg_growth < 0.5 * blobs else 'NOT MET'}",
        f"- the current model version has no TTL: {model_ttl}",
        f"- after the round: uploads deleted, {no_ttl} new keys without a TTL besides the current "
        f"model version "
        f"({'MET' if no_ttl == 0 else 'NOT MET'}); the rest expires (task results after "
        f"1 h, round bookkeeping after 7 days)",
    ]
    return "\n".join(lines)


def _ttl(seconds: int) -> str:
    if seconds < 0:
        return "none"
    return f"{seconds / 3600:.0f} h" if seconds >= 3600 else f"{seconds} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = measure(args.shards, args.threads, args.features)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
