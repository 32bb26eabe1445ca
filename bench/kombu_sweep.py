"""What the watcher's sweep of kombu's volunteer-writable keys costs (coordinator.rounds.bookkeeping).

A private Redis holds ``--keys`` other keys (a busy broker's rounds and uploads), the bookkeeping
of ``--held`` messages held by living workers, and nothing to sweep; the sweep runs ``--repeat``
times. Prints the median seconds per sweep: what the aggregator's watcher spends once a period.

    nice -n 10 python bench/kombu_sweep.py --keys 200000 --held 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Cluster
from broker import keys
from coordinator.rounds.bookkeeping import sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=200_000)
    p.add_argument("--held", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    cluster = Cluster("kombu-sweep")
    try:
        r = cluster.client
        pipe = r.pipeline(transaction=False)
        for i in range(args.keys):
            pipe.set(f"ct:run:bench:round:{i}", b"x" * 64)
            if i % 10_000 == 9_999:
                pipe.execute()
        now = time.time()
        for i in range(args.held):
            pipe.hset(keys.UNACKED, f"tag-{i}", b"m" * 1500)
            pipe.zadd(keys.UNACKED_INDEX, {f"tag-{i}": now})
        pipe.rpush("train", *[b"m" * 1500] * 100)
        pipe.sadd("_kombu.binding.train", "train\x06\x16\x06\x16train")
        pipe.execute()
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            swept = sweep(r)
            times.append(time.perf_counter() - started)
            assert not swept, swept
        print(json.dumps({"keys": args.keys, "held": args.held, "median_seconds": statistics.median(times)}))
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
