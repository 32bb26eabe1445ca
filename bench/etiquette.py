"""How well a volunteer keeps to its owner's rules: CPU share under --cpu-limit, pause latency, work lost.

One private Redis, one aggregator, and a volunteer training charlm (one long
shard) at a time, with all the machine's cores for torch:

- unlimited, then ``--cpu-limit 25`` and ``--cpu-limit 50``: the process tree's
  share of the machine's CPU time over ``--window`` seconds (psutil), and its
  training speed (steps reported on the control socket, times the batch size)
  against the unlimited volunteer's, measured the same way in the same run;
- ``--pauses`` times ``volunteer pause`` (the control socket) on the unlimited
  volunteer: the time until its process tree stops using the CPU (the first
  moment from which it uses under 5% of one core for half a second), and the
  steps lost (trained before the pause, not in the shard it resumes);
  the median and the worst.

    python bench/etiquette.py [--window 30] [--pauses 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Cluster, median
from volunteer import control

IDLE_CORE = 0.05  # under 5% of one core ...
IDLE_SPAN = 0.5  # ... for this long is "no CPU use"
SAMPLE = 0.05
BATCH = 16  # charlm's default batch size: samples per step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each CPU share measurement")
    parser.add_argument("--pauses", type=int, default=10)
    parser.add_argument("--limits", default="25,50", help="the --cpu-limit values to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cores = psutil.cpu_count() or 1
    rows = []
    with Cluster("etiquette") as cluster:
        cluster.env["CROWDTRAIN_TORCH_THREADS"] = str(cores)  # the volunteer may take every core
        cluster.env["OMP_NUM_THREADS"] = str(cores)
        cluster.aggregator()
        home = Path(cluster.env["CROWDTRAIN_HOME"])
        pauses: dict[str, float] = {}
        for limit in [None, *(float(x) for x in args.limits.split(","))]:
            name = "unlimited" if limit is None else f"limit{limit:g}"
            run = f"r-{name}"
            extra = [] if limit is None else ["--cpu-limit", f"{limit:g}"]
            cluster.coordinator("init", "--run", run, "--job", "charlm", "--local-steps", "1000000")
            volunteer = cluster.start(
                ["-m", "cli.volunteer", "start", "--device", "cpu", "--name", name, *extra],
                f"volunteer-{name}.log",
            )
            cluster.coordinator("post-round", "--run", run, "--shards", "1", "--deadline", "3600")
            _wait(lambda n=name, r=run: _training(home, n, r), f"{name} to train {run}: {cluster.dir}")
            share, steps_per_s = _measure(volunteer.pid, home, name, args.window, cores)
            rows.append({"limit": limit, "share": share, "samples_per_s": steps_per_s * BATCH})
            if limit is None:
                pauses = _pauses(volunteer.pid, home, name, args.pauses)
            os.killpg(volunteer.pid, 15)
            volunteer.wait(30)
            cluster.coordinator("abort-round", "--run", run)  # its shard, back on the queue, is not wanted
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speed_vs_unlimited"] = row["samples_per_s"] / base if base else None
    document = {"cores": cores, "window_s": args.window, "rows": rows, "pauses": pauses}
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"{cores} cores, CPU share over {args.window:g} s (process tree / all cores' time)")
    print(f"{'--cpu-limit':>12} {'share':>8} {'samples/s':>10} {'vs unlimited':>13}")
    for row in rows:
        limit = "none" if row["limit"] is None else f"{row['limit']:g}%"
        print(
            f"{limit:>12} {100 * row['share']:7.1f}% {row['samples_per_s']:10.1f} "
            f"{row['speed_vs_unlimited']:12.2f}x"
        )
    print(
        f"pause -> no CPU use: median {pauses['median_s']:.2f} s, worst {pauses['worst_s']:.2f} s "
        f"({pauses['count']} pauses); steps lost per pause: median {pauses['lost_median']}, "
        f"worst {pauses['lost_worst']}"
    )
    return 0


def _measure(pid: int, home: Path, name: str, window: float, cores: int) -> tuple[float, float]:
    """(share of the machine's CPU time, steps per second) over ``window`` seconds."""
    step0, cpu0, t0 = _status(home, name)["step"], _tree_cpu(pid), time.monotonic()
    time.sleep(window)
    step1, cpu1, t1 = _status(home, name)["step"], _tree_cpu(pid), time.monotonic()
    return (cpu1 - cpu0) / ((t1 - t0) * cores), (step1 - step0) / (t1 - t0)


def _pauses(pid: int, home: Path, name: str, count: int) -> dict[str, float]:
    """Pause and resume ``count`` times; pause-to-idle seconds and steps lost, median and worst."""
    latencies, lost = [], []
    for _ in range(count):
        time.sleep(1.0)  # let it train a little between pauses
        before = _status(home, name)["step"]
        began = time.monotonic()
        control.request(control.socket_path(home, name), "pause")
        samples = []
        while time.monotonic() - began < 5.0:
            samples.append((time.monotonic() - began, _tree_cpu(pid)))
            time.sleep(SAMPLE)
        latencies.append(_idle_from(samples))
        _wait(lambda: _status(home, name)["step"] is not None)
        paused_at = _status(home, name)["step"]
        control.request(control.socket_path(home, name), "resume")
        _wait(lambda: _status(home, name)["state"] == "training")
        resumed_from = _status(home, name)["step"]
        lost.append(max(0, before - min(paused_at, resumed_from)))
    return {
        "count": count,
        "median_s": median(latencies),
        "worst_s": max(latencies),
        "all_s": [round(x, 3) for x in latencies],
        "lost_median": median(lost),
        "lost_worst": max(lost),
    }


def _idle_from(samples: list[tuple[float, float]]) -> float:
    """The first time from which the tree used under IDLE_CORE of a core for IDLE_SPAN seconds."""
    for i, (t, cpu) in enumerate(samples):
        later = [(u, c) for u, c in samples[i:] if u - t >= IDLE_SPAN]
        if not later:
            break
        u, c = later[0]
        if (c - cpu) / (u - t) < IDLE_CORE:
            return t
    return float("inf")


def _tree_cpu(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def _status(home: Path, name: str) -> dict:
    try:
        return control.request(control.socket_path(home, name), "status")
    except OSError:
        return {"step": None, "state": None}


def _training(home: Path, name: str, run: str) -> bool:
    now = _status(home, name)
    return now.get("run") == run and (now.get("step") or 0) > 3


def _wait(condition, what: str = "", timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
