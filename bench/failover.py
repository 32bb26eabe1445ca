"""Failover: how long a run stalls when the Redis primary dies behind Sentinel, and what is redone.

    python bench/failover.py [--kills 5] [--json]

A Redis 7 primary, its replica and three sentinels (``tests.fixtures.servers.SentinelCluster``,
down-after-milliseconds 1000, failover-timeout 3000), all on free ports; against them, through
``sentinel://`` URLs: ``coordinator aggregator``, two ``volunteer start`` processes and one long
``coordinator run`` of the slowed tiny job (4 shards a round, ~0.6 s a shard). ``--kills`` times,
while a round is half done, the primary is SIGKILLed; the run goes on on the promoted replica, and
the dead node is restarted (Sentinel makes it the new primary's replica) before the next kill.

Per kill, from the aggregator's and volunteers' own log lines (wall clock, ms):
* seconds from the SIGKILL to the next accepted upload, and to the next model version. An upload
  or version logged in the first 0.5 s was written to the dead primary before it died (a failover
  cannot finish before the sentinels' 1 s down-after time), so the clock starts counting after it;
* work redone: shard trainings of the run beyond one per (round, shard), trainings that ended in
  no accepted upload, and shards offered again (a train message lost with the primary comes back
  after the lease's offer time, 10 s).
The baseline, in the same run: the median seconds between two versions while no node dies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, _pythonpath, median

SLOW_JOB = "tests.fixtures.jobs_slow:make_job"
SHARDS = 4
SETTLED = 0.5  # seconds after the kill within which a log line is the dead primary's write
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO "
ACCEPTED = re.compile(_STAMP + r"crowdtrain\.intake: accepted r round (\d+) shard (\d+) from", re.M)
VERSION = re.compile(_STAMP + r"crowdtrain\.aggregator: round (\d+) of r -> version (\d+)", re.M)
OFFERED = re.compile(_STAMP + r"crowdtrain\.leases: offered r round \d+ shards \[([\d, ]+)\] again", re.M)
TRAINED = re.compile(_STAMP + r"crowdtrain\.volunteer: r round (\d+) shard (\d+): \d+ steps", re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the servers' and processes' logs")
    args = parser.parse_args(argv)
    result = measure(args.kills, args.keep)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    return 0


def measure(kills: int, keep: bool = False) -> dict:
    from broker.client import redis_client
    from broker.settings import Settings
    from coordinator.store import Store
    from tests.fixtures.servers import SentinelCluster

    folder = Path(tempfile.mkdtemp(prefix="crowdtrain-bench-failover-"))
    cluster = SentinelCluster(folder / "redis", down_after_ms=1000, failover_timeout_ms=3000)
    procs: list[subprocess.Popen] = []
    try:
        cluster.start()
        url = cluster.url()
        env = {
            **os.environ,
            "PYTHONPATH": _pythonpath(),
            "CROWDTRAIN_BROKER_URL": url,
            "CROWDTRAIN_HOME": str(folder / "home"),
            "CROWDTRAIN_TORCH_THREADS": "1",
            "CROWDTRAIN_VISIBILITY_TIMEOUT": "6",
            "CROWDTRAIN_TEST_STEP_SECONDS": "0.2",
            "OMP_NUM_THREADS": "1",
        }
        logs = folder / "logs"
        logs.mkdir()

        def spawn(name: str, *argv: str) -> subprocess.Popen:
            with open(logs / f"{name}.log", "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                    start_new_session=True,
                )  # fmt: skip
            procs.append(proc)
            return proc

        spawn("aggregator", "-m", "cli.coordinator", "aggregator", "--name", "agg")
        for name in ("v1", "v2"):
            spawn(
                name,
                "-m",
                "cli.volunteer",
                "start",
                "--device",
                "cpu",
                "--name",
                name,
                "--allow-job",
                SLOW_JOB,
            )
        subprocess.run(
            [sys.executable, "-m", "cli.coordinator", "init", "--run", "r", "--job", SLOW_JOB,
             "--local-steps", "3", "--shards", str(SHARDS), "--deadline", "120", "--json"],
            env=env, cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        run = spawn("run", "-m", "cli.coordinator", "run", "--run", "r", "--rounds", "100000")
        store = Store(redis_client(Settings(broker_url=url)))
        _wait(lambda: store.version("r") >= 3, 180, "three versions before the first kill")
        kill_times: list[float] = []
        for _ in range(kills):
            _wait(lambda: _half_done(store), 120, "a half-done round")
            dead = cluster.kill_primary()
            kill_times.append(time.time())
            survivor = cluster.wait_failover(dead)
            _wait(lambda k=kill_times[-1]: _version_after(logs, k), 120, "a version after the kill")
            cluster.rejoin(dead, survivor)  # as the new primary's replica, never as a stale primary
            now = store.version("r")
            _wait(lambda n=now: store.version("r") >= n + 2, 120, "two calm versions")
        run.send_signal(signal.SIGINT)
        run.wait(60)
        return _results(logs, store, kill_times)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        cluster.stop()
        if keep:
            print(f"logs kept in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _results(logs: Path, store, kill_times: list[float]) -> dict:
    aggregator = (logs / "aggregator.log").read_text(errors="replace")
    accepted = sorted(_epoch(m.group(1)) for m in ACCEPTED.finditer(aggregator))
    versions = [(_epoch(m.group(1)), int(m.group(3))) for m in VERSION.finditer(aggregator)]
    trained: list[tuple[int, int]] = []
    for name in ("v1", "v2"):
        text = (logs / f"{name}.log").read_text(errors="replace")
        trained += [(int(m.group(2)), int(m.group(3))) for m in TRAINED.finditer(text)]
    kills = []
    for killed in kill_times:
        upload = next(t for t in accepted if t > killed + SETTLED)
        version = next(t for t, _ in versions if t > killed + SETTLED)
        kills.append(
            {"to_next_upload_s": round(upload - killed, 2), "to_next_version_s": round(version - killed, 2)}
        )
    calm = [
        later - earlier
        for (earlier, _), (later, _) in zip(versions, versions[1:], strict=False)
        if not any(earlier - 1 <= k <= later for k in kill_times)
    ]
    numbers = [v for _, v in versions]
    rounds = store.rounds.count("r")
    done = [n for n in range(1, rounds + 1) if store.rounds.status("r", n) == "done"]
    counted = Counter(trained)
    accepted_total = sum(int(store.rounds.info("r", n).get("accepted", 0)) for n in done)
    return {
        "kills": kills,
        "median_to_next_upload_s": round(median([k["to_next_upload_s"] for k in kills]), 2),
        "median_to_next_version_s": round(median([k["to_next_version_s"] for k in kills]), 2),
        "baseline_seconds_per_version": round(median(calm), 2),
        "versions_consecutive": numbers == list(range(numbers[0], numbers[0] + len(numbers))),
        "rounds": rounds,
        "rounds_done": len(done),
        "trainings": len(trained),
        "trained_again": sum(c - 1 for c in counted.values()),
        "trained_not_accepted": len(trained) - accepted_total,
        "accepted": accepted_total,
        "offered_again": sum(len(m.group(2).split(",")) for m in OFFERED.finditer(aggregator)),
    }


def report(result: dict) -> None:
    base = result["baseline_seconds_per_version"]
    print(f"{'kill':>4} {'to next upload s':>17} {'to next version s':>18}")
    for number, kill in enumerate(result["kills"], 1):
        print(f"{number:>4} {kill['to_next_upload_s']:>17.2f} {kill['to_next_version_s']:>18.2f}")
    print(
        f"median: next upload {result['median_to_next_upload_s']:.2f} s, next version "
        f"{result['median_to_next_version_s']:.2f} s ({result['median_to_next_version_s'] / base:.1f}x "
        f"a calm version's {base:.2f} s)"
    )
    print(
        f"{result['rounds_done']}/{result['rounds']} rounds done, versions consecutive: "
        f"{result['versions_consecutive']}; {result['trainings']} shard trainings, "
        f"{result['trained_again']} of a (round, shard) trained before, "
        f"{result['trained_not_accepted']} not accepted; {result['accepted']} accepted; "
        f"{result['offered_again']} shard offers made again (messages lost with a primary, or refused)"
    )


def _half_done(store) -> bool:
    number = store.rounds.count("r")
    info = store.rounds.info("r", number) or {}
    return info.get("status") == "open" and 1 <= int(info.get("accepted", 0)) < SHARDS


def _version_after(logs: Path, killed: float) -> bool:
    text = (logs / "aggregator.log").read_text(errors="replace")
    return any(_epoch(m.group(1)) > killed + SETTLED for m in VERSION.finditer(text))


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _wait(condition, timeout: float, what: str) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


if __name__ == "__main__":
    sys.exit(main())
