"""An idle aggregator: its CPU per minute between rounds, and how fast it answers a lease request.

    nice -n 19 python bench/idle.py [--seconds 60] [--samples 30] [--turns 2] [--baseline DIR ...] [--json]
    nice -n 19 python bench/idle.py --seconds 5 --samples 1 --busy-samples 100 --turns 3 --baseline DIR

One private redis-server and one run (``coordinator init``, the tiny job, no round open, no
volunteer). A real ``coordinator aggregator`` process starts, settles for ``--settle`` s, and
then sits idle for ``--seconds`` s: the figure is the CPU time (user + system) of its process
tree over that window, per minute. Then ``--samples`` lease requests are made as a volunteer
makes them (``VolunteerStore.lease``: the request, then a ``BLPOP`` for the answer; a round that
is not open, so each is refused at once), each after 2 to 2.5 s of silence so that it finds the
intake backed off as far as it goes (a second of nothing, then a few doublings): the latency is
the time from the request to its answer, median and worst. ``busy``: the same requests while a
second volunteer asks for a lease without pause (the intake takes something every poll), 1/20
to 1/10 s apart (``--busy-samples`` of them, by default as many).

``--baseline DIR`` runs an aggregator from another checkout (e.g. ``git worktree add --detach
/tmp/idle_base main``) in turns with this one's, on the same Redis and run, ``--turns`` times
each; ratios are this checkout's over the baseline's, medians of the turns. Given more than one
directory, each is an arm named after its folder, and ratios are against the first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.harness import ROOT, TINY_JOB, Cluster, median

RUN = "idle"


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children, as far as they are alive."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def start_aggregator(c: Cluster, root: Path, name: str) -> subprocess.Popen:
    """``coordinator aggregator`` run from the checkout at ``root``, on the cluster's Redis."""
    return c.start(
        ["-m", "cli.coordinator", "aggregator", "--broker", c.url, "--name", name], f"{name}.log", root
    )


def stop(c: Cluster, proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    c.procs.remove(proc)


def lease_latencies(c: Cluster, samples: int, gap: tuple[float, float], rng: random.Random) -> list[float]:
    """Seconds from each lease request to its answer, ``gap`` s of silence before each."""
    import redis

    from volunteer.store import VolunteerStore

    asker = VolunteerStore(redis.Redis.from_url(c.url), "bench-idle")
    out = []
    for _ in range(samples):
        time.sleep(rng.uniform(*gap))
        t0 = time.perf_counter()
        answer = asker.lease(RUN, 1, 0, wait=10)
        out.append(time.perf_counter() - t0)
        if answer.get("reason", "").startswith("no answer"):
            raise RuntimeError(f"the aggregator did not answer a lease request: {answer}; logs in {c.dir}")
    return out


def busy_latencies(c: Cluster, samples: int, rng: random.Random) -> list[float]:
    """As ``lease_latencies`` while another volunteer asks for leases back to back."""
    import redis

    from volunteer.store import VolunteerStore

    done = threading.Event()

    def hammer() -> None:
        other = VolunteerStore(redis.Redis.from_url(c.url), "bench-busy")
        while not done.is_set():
            other.lease(RUN, 1, 1, wait=10)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        return lease_latencies(c, samples, (0.05, 0.1), rng)
    finally:
        done.set()
        thread.join(15)


def one_turn(c: Cluster, label: str, root: Path, args: argparse.Namespace, rng: random.Random) -> dict:
    name = f"bench-{label}"
    proc = start_aggregator(c, root, name)
    try:
        c.wait_for_workers([name])
        time.sleep(args.settle)
        before, t0 = tree_cpu(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        used, elapsed = tree_cpu(proc.pid) - before, time.monotonic() - t0
        idle = lease_latencies(c, args.samples, (2.0, 2.5), rng)
        busy = busy_latencies(c, args.busy_samples or args.samples, rng) if args.busy else []
    finally:
        stop(c, proc)
    row = {
        "code": label,
        "cpu_s_per_min": used / elapsed * 60,
        "cpu_share": used / elapsed,
        "idle_lease_ms_median": median(idle) * 1e3,
        "idle_lease_ms_worst": max(idle) * 1e3,
    }
    if busy:
        row.update(busy_lease_ms_median=median(busy) * 1e3, busy_lease_ms_worst=max(busy) * 1e3)
    return row


def measure(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    named = len(args.baseline) > 1
    arms = [("this", ROOT)]
    arms += [(d.resolve().name if named else "baseline", d.resolve()) for d in args.baseline]
    rows: list[dict] = []
    with Cluster("idle") as c:
        c.coordinator("init", "--run", RUN, "--job", TINY_JOB, "--local-steps", "1", "--json")
        for turn in range(args.turns):
            for label, root in arms if turn % 2 == 0 else arms[::-1]:
                row = one_turn(c, label, root, args, rng)
                row["turn"] = turn
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    summary: dict[str, dict[str, float]] = {}
    for label, _ in arms:
        mine = [r for r in rows if r["code"] == label]
        summary[label] = {k: median([r[k] for r in mine]) for k in mine[0] if k not in ("code", "turn")}
    result: dict = {
        "seconds": args.seconds,
        "samples": args.samples,
        "turns": args.turns,
        "load_average": os.getloadavg()[0],
        "rows": rows,
        "summary": summary,
    }
    if args.baseline:
        base = arms[1][0]
        mine = summary["this"]
        result["ratios"] = {k: mine[k] / summary[base][k] for k in mine if summary[base][k]}
        result["baseline"] = base
    return result


def markdown(result: dict) -> str:
    lines = [
        "| code | turn | CPU s per idle min | idle lease ms median | worst | busy lease ms median | worst |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['code']} | {r['turn']} | {r['cpu_s_per_min']:.3f} | {r['idle_lease_ms_median']:.1f} | "
            f"{r['idle_lease_ms_worst']:.1f} | {r.get('busy_lease_ms_median', float('nan')):.1f} | "
            f"{r.get('busy_lease_ms_worst', float('nan')):.1f} |"
        )
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- {k}, this / {result['baseline']}: {v:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="idle window per turn (default 60)")
    parser.add_argument("--settle", type=float, default=5, help="seconds after start before measuring")
    parser.add_argument("--samples", type=int, default=30, help="lease requests per turn (default 30)")
    parser.add_argument("--turns", type=int, default=2, help="turns per checkout, alternating (default 2)")
    parser.add_argument(
        "--busy-samples", type=int, default=None, help="busy lease requests (default --samples)"
    )
    parser.add_argument("--no-busy", dest="busy", action="store_false", help="skip the busy latencies")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[], metavar="DIR", help="other checkouts")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if args.seconds <= 0 or args.samples < 1 or args.turns < 1 or args.settle < 0:
        parser.error("--seconds must be positive, --samples and --turns at least 1, --settle not negative")
    if args.busy_samples is not None and args.busy_samples < 1:
        parser.error("--busy-samples must be at least 1")
    for folder in args.baseline:
        if not (folder / "cli" / "coordinator.py").is_file():
            parser.error(f"--baseline {folder}: not a crowdtrain checkout (no cli/coordinator.py)")
    if len({d.resolve().name for d in args.baseline}) < len(args.baseline):
        parser.error("--baseline: give folders of different names (each arm is named after its folder)")
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
