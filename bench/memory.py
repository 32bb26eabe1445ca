"""Memory against model size: aggregator and volunteer peak RSS above idle, per round, per size.

    python bench/memory.py [--sizes 1e6,1e7,1e8,3e8] [--rounds 2] [--shards 1] [--slices 1,2,4,8]
                           [--compression none,default] [--pool solo] [--trace] [--machine-gib 24] [--json]

For each size a fresh private redis-server, ``coordinator aggregator`` (Celery solo pool)
and one ``volunteer start --device cpu --concurrency 1 --pool solo`` are started
(``bench/harness.py``). Once both answer a ping and have settled, their RSS is the idle
baseline and their peak counters are reset (``/proc/PID/clear_refs``: 5), and a thread
samples every process's ``VmRSS`` every 50 ms. Then ``coordinator init`` (fedavg,
``--verify none``) creates a run of the job ``bench/memory_job.py`` with exactly N float32
parameters (a near-free training step: 1 local AdamW step) for each codec of
``--compression`` (``default``: init's own default, lossy both ways, so the downlink
update and residual and the volunteer's error-feedback residual are held too; ``none``:
the largest deltas, nothing else), and ``--rounds`` rounds of
``--shards`` shards run through ``coordinator post-round --wait``, each until the
aggregator has written its checkpoint. Peak = the larger of ``VmHWM`` and the sampled
maximum, for every process of the volunteer's tree (with ``--pool prefork`` the worker
child is the one that trains); "above idle" subtracts the baseline.

``--slices`` (default 1) runs each size and codec once per slice count S: ``init --slices S``
(shards posted one per round, so the one volunteer trains slice 0 each round) and reports
the volunteer's peak against the S = 1 row of the same size and codec (issue 25's goal: at
S = 4 at most 0.5x) and the largest model whose slice a ``--machine-gib`` volunteer could
train, from the volunteer's own bytes per parameter (an extrapolation, not a run).

Bounds (docs/BENCHMARKS.md section 10): aggregator under 4x the model's float32 size for
a streaming strategy, volunteer under 6x. A size that cannot run (init refused, a round that
fails, a process that dies, a timeout) is a row "failed: <reason>", and the next size runs.

"Largest model one machine can run a round of": every process of a round on one machine
(Redis, aggregator, volunteer, the coordinator CLI) is summed in each sample; the largest
sum above the idle sum, divided by the parameter count, is a slope in bytes per parameter.
``--machine-gib`` (24) minus the idle sum, over the slope of the largest size that passed,
estimates the largest model; it is an extrapolation, not a run (blobs are chunked, so
Redis's 512 MB value limit no longer binds). ``--trace`` runs both processes under
``bench/memtrace.py`` and prints, for the largest size that passed, RSS above idle on entry
and exit of every memory-heavy step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Cluster, redis_memory, rss_kib
from serialization import parse_codec

JOB = "bench.memory_job:make_job"
AGG_BOUND = 4.0
VOL_BOUND = 6.0
SAMPLE_SECONDS = 0.05
MIB = 2**20
DEFAULT_SIZES = "1e6,1e7,1e8,3e8"
# Rough bytes per parameter a round needs on one machine, all processes together: a size
# whose estimate exceeds the memory available is skipped rather than risking the OOM killer.
PLANNING_BYTES_PER_PARAM = 4 * 14


@dataclass
class Tree:
    """One long-running process and its children: idle RSS and peak per pid."""

    root: int
    idle: dict[int, int] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)

    def pids(self) -> list[int]:
        return [self.root, *_descendants(self.root)]

    def settle(self) -> bool:
        """Record every pid's idle RSS and reset its peak counter; False if a reset failed."""
        reset = True
        for pid in self.pids():
            self.idle[pid] = _rss(pid)
            self.peak[pid] = self.idle[pid]
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                reset = False
        return reset

    def sample(self) -> int:
        total = 0
        for pid in self.pids():
            rss = _rss(pid)
            total += rss
            self.peak[pid] = max(self.peak.get(pid, 0), rss)
        return total

    def finish(self) -> None:
        for pid in self.pids():
            self.peak[pid] = max(self.peak.get(pid, 0), _rss(pid, "VmHWM"))

    def worker(self) -> int:
        """The process whose peak rose most above its own idle RSS (with prefork: the child that trained)."""
        return max(self.peak, key=lambda pid: self.peak[pid] - self.idle.get(pid, 0), default=self.root)

    def idle_kib(self) -> int:
        return self.idle.get(self.worker(), 0)

    def above_idle_kib(self) -> int:
        return self.peak.get(self.worker(), 0) - self.idle_kib()


class Sampler(threading.Thread):
    """Every SAMPLE_SECONDS: each tree's RSS, plus ``extra`` pids (the coordinator CLI); the largest sum."""

    def __init__(self, trees: list[Tree]) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.trees = trees
        self.extra: list[int] = []
        self.max_total = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = sum(tree.sample() for tree in self.trees)
            total += sum(_rss(pid) for pid in list(self.extra))
            self.max_total = max(self.max_total, total)
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Failed(Exception):
    """This size could not run a round; the message is the row's one-line reason."""


def measure(params: int, args: argparse.Namespace, codec: str = "none", slices: int = 1) -> dict[str, Any]:
    """One size, codec and slice count on a fresh cluster: idle and peak RSS of both sides, Redis, machine."""
    row: dict[str, Any] = {
        "params": params,
        "codec": codec,
        "slices": slices,
        "model_mib": 4 * params / MIB,
        "status": "passed",
    }
    needed = PLANNING_BYTES_PER_PARAM * params
    available = _available_bytes()
    if needed > available and not args.force:
        row.update(
            status="skipped", reason=f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} available"
        )
        return row
    with Cluster(f"memory-{params:.0e}") as cluster:
        trace_dir = cluster.dir if args.trace else None
        agg = _aggregator(cluster, trace_dir)
        vol = _volunteer(cluster, args.pool, trace_dir)
        try:
            cluster.wait_for_workers(["mem-vol", "bench-agg"], timeout=180)
            time.sleep(2.0)  # let imports and Celery's start-up settle
            trees = [Tree(agg.pid), Tree(vol.pid), Tree(cluster.redis_proc.pid)]
            row["hwm_reset"] = all([tree.settle() for tree in trees])
            idle_total = sum(sum(tree.idle.values()) for tree in trees)
            redis_before = redis_memory(cluster.client)["used"]
            sampler = Sampler(trees)
            sampler.start()
            try:
                row["rounds"] = _run_rounds(cluster, sampler, params, args, codec, slices)
                time.sleep(0.3)
            finally:
                sampler.stop()
        except Failed as e:
            row.update(status="failed", reason=str(e))
            return row
        for tree in trees:
            tree.finish()
        model = 4 * params
        agg_tree, vol_tree = trees[0], trees[1]
        row.update(
            agg_idle_mib=agg_tree.idle_kib() / 1024,
            agg_above_mib=agg_tree.above_idle_kib() / 1024,
            vol_idle_mib=vol_tree.idle_kib() / 1024,
            vol_above_mib=vol_tree.above_idle_kib() / 1024,
            redis_above_mib=(redis_memory(cluster.client)["peak"] - redis_before) / MIB,
            machine_idle_mib=idle_total / 1024,
            machine_above_mib=(sampler.max_total - idle_total) / 1024,
        )
        row["agg_x"] = row["agg_above_mib"] * MIB / model
        row["vol_x"] = row["vol_above_mib"] * MIB / model
        row["agg_ok"] = row["agg_x"] < AGG_BOUND
        row["vol_ok"] = row["vol_x"] < VOL_BOUND
        row["round_seconds"] = [r["seconds"] for r in row["rounds"]]
        if trace_dir is not None:
            row["trace"] = {
                side: _trace(trace_dir / f"trace-{side}.jsonl", tree.idle_kib(), model)
                for side, tree in (("aggregator", agg_tree), ("volunteer", vol_tree))
            }
    return row


def _aggregator(cluster: Cluster, trace_dir: Path | None) -> subprocess.Popen:
    argv = ["-m", "cli.coordinator", "aggregator", "--broker", cluster.url, "--name", "bench-agg"]
    return cluster.start(_traced(argv, trace_dir, "aggregator"), "aggregator.log")


def _volunteer(cluster: Cluster, pool: str, trace_dir: Path | None) -> subprocess.Popen:
    argv = [
        "-m", "cli.volunteer", "start", "--broker", cluster.url, "--device", "cpu",
        "--concurrency", "1", "--pool", pool, "--name", "mem-vol", "--allow-job", JOB,
    ]  # fmt: skip
    return cluster.start(_traced(argv, trace_dir, "volunteer"), "volunteer.log")


def _traced(argv: list[str], trace_dir: Path | None, side: str) -> list[str]:
    if trace_dir is None:
        return argv
    return ["bench/memtrace.py", str(trace_dir / f"trace-{side}.jsonl"), *argv[1:]]


def _run_rounds(
    cluster: Cluster, sampler: Sampler, params: int, args: argparse.Namespace, codec: str, slices: int = 1
) -> list[dict]:
    """``init``, then ``--rounds`` rounds, each until the aggregator's checkpoint is written."""
    chosen = [] if codec == "default" else ["--compression", codec]
    if slices > 1:  # a sliced run has S shards or more; each round posts --shards of them
        chosen += ["--slices", str(slices)]
    _coordinator(
        cluster, sampler, args.timeout,
        "init", "--run", "mem", "--job", JOB, "--job-arg", f"params={params}",
        "--job-arg", f"tensors={args.tensors}", "--strategy", "fedavg", *chosen,
        "--local-steps", "1", "--verify", "none", "--shards", str(max(args.shards, slices)),
        "--deadline", str(args.timeout), "--lr", "0.001", "--json",
    )  # fmt: skip
    metrics = cluster.dir / "home" / "runs" / "mem" / "metrics.jsonl"
    records = []
    for number in range(1, args.rounds + 1):
        started = time.perf_counter()
        out = _coordinator(
            cluster, sampler, args.timeout,
            "post-round", "--run", "mem", "--shards", str(args.shards), "--wait", "--json",
        )  # fmt: skip
        record = json.loads(out)["rounds"][0]
        if record["status"] != "done":
            raise Failed(f"round {number} {record['status']}: {record.get('reason', '?')}")
        deadline = time.monotonic() + args.timeout
        while not metrics.exists() or len(metrics.read_text().splitlines()) < number:
            _check_alive(cluster)
            if time.monotonic() > deadline:
                raise Failed(f"round {number}: no checkpoint after {args.timeout:.0f} s")
            time.sleep(0.05)
        records.append({"seconds": time.perf_counter() - started, "merge_seconds": record["seconds"]})
    return records


def _coordinator(cluster: Cluster, sampler: Sampler, timeout: float, *argv: str) -> str:
    """One ``coordinator`` command, sampled with the cluster; its stdout, or Failed with its reason."""
    out, err = cluster.dir / "cli.out", cluster.dir / "cli.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.coordinator", *argv, "--broker", cluster.url],
            cwd=cluster.dir, env=cluster.env, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    sampler.extra = [proc.pid]
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise Failed(f"coordinator {argv[0]} still running after {timeout:.0f} s")
            _check_alive(cluster)
            time.sleep(0.05)
    finally:
        sampler.extra = []
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise Failed(f"coordinator {argv[0]}: {reason.removeprefix(f'coordinator {argv[0]}: ')}")
    return out.read_text()


def _check_alive(cluster: Cluster) -> None:
    for proc in cluster.procs:
        code = proc.poll()
        if code is not None:
            argv = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
            cli = [a for a in argv if a.endswith(".cli")]
            name = (
                "redis-server"
                if proc is cluster.redis_proc
                else " ".join(argv[argv.index(cli[0]) :][:2] if cli else argv[:2])
            )
            killed = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise Failed(f"{name} exited with status {code}{killed}; logs in {cluster.dir}")


def _trace(path: Path, idle_kib: int, model: int) -> list[dict[str, Any]]:
    """One entry per traced call, in order: depth, step, RSS above idle on entry/exit and peak (x model)."""
    if not path.exists():
        return []
    calls: list[dict[str, Any]] = []
    stacks: dict[str, list[dict[str, Any]]] = {}  # per thread: the aggregator's watcher thread too

    def x(kib: int) -> float:
        return round((kib - idle_kib) * 1024 / model, 2)

    for line in path.read_text().splitlines():
        event = json.loads(line)
        thread = event.get("thread", "MainThread")
        stack = stacks.setdefault(thread, [])
        if event["event"] == "enter":
            step = event["step"] if thread == "MainThread" else f"{event['step']} [{thread} thread]"
            call = {"depth": len(stack), "step": step, "enter_x": x(event["rss"]), "_hwm": event["hwm"]}
            stack.append(call)
            calls.append(call)
        elif stack:
            call = stack.pop()
            call["exit_x"] = x(event["rss"])
            call["peak_x"] = x(event["hwm"])
            call["new_peak"] = event["hwm"] > call.pop("_hwm")
    return calls


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _rss(pid: int, field: str = "VmRSS") -> int:
    try:
        return rss_kib(pid, field)
    except (OSError, LookupError):
        return 0


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate(rows: list[dict[str, Any]], machine_gib: float) -> dict[str, Any]:
    """The largest model one machine of ``machine_gib`` could run a round of, from the largest pass."""
    passed = [r for r in rows if r["status"] == "passed"]
    if not passed:
        return {"machine_gib": machine_gib, "largest_passed": None}
    best = max(passed, key=lambda r: r["params"])
    slope = best["machine_above_mib"] * MIB / best["params"]  # bytes per parameter, all processes
    memory_bound = int((machine_gib * 2**30 - best["machine_idle_mib"] * MIB) / slope)
    return {
        "machine_gib": machine_gib,
        "largest_passed": best["params"],
        "bytes_per_param": slope,
        "idle_mib": best["machine_idle_mib"],
        "largest_params": memory_bound,
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"### Memory against model size: fedavg, {args.rounds} round(s) of {args.shards} shard(s), "
        f"1 local AdamW step, 1 volunteer (`--pool {args.pool}`); codec `default` is init's own "
        "(lossy both ways)",
        "",
        "| params | codec | slices | float32 MiB | aggregator idle MiB | aggregator peak above idle | "
        "volunteer idle MiB | volunteer peak above idle | Redis peak growth | all processes above idle "
        f"| round s | aggregator < {AGG_BOUND:.0f}x | volunteer < {VOL_BOUND:.0f}x |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        head = f"| {_count(r['params'])} | {r['codec']} | {r.get('slices', 1)} | {r['model_mib']:.0f} |"
        if r["status"] != "passed":
            lines.append(f"{head} {r['status']}: {r['reason']} | | | | | | | | |")
            continue
        seconds = " / ".join(f"{s:.1f}" for s in r["round_seconds"])
        lines.append(
            f"{head} {r['agg_idle_mib']:.0f} | {r['agg_above_mib']:.0f} MiB = {r['agg_x']:.2f}x | "
            f"{r['vol_idle_mib']:.0f} | {r['vol_above_mib']:.0f} MiB = {r['vol_x']:.2f}x | "
            f"{r['redis_above_mib'] / r['model_mib']:.2f}x | {r['machine_above_mib']:.0f} MiB | {seconds} | "
            f"{'met' if r['agg_ok'] else 'MISSED'} | {'met' if r['vol_ok'] else 'MISSED'} |"
        )
    lines += _slice_lines(rows, args.machine_gib)
    for codec in dict.fromkeys(r["codec"] for r in rows):
        est = estimate([r for r in rows if r["codec"] == codec and r.get("slices", 1) == 1], args.machine_gib)
        lines.append("")
        if est["largest_passed"] is None:
            lines.append(f"Codec {codec}: no size passed, no estimate of the largest model.")
            continue
        lines.append(
            f"Codec {codec}: largest model one {est['machine_gib']:.0f} GiB machine can run a round "
            f"of (estimated, not run): ~{_count(est['largest_params'])} parameters. From the largest "
            f"size that passed ({_count(est['largest_passed'])}): all processes together (Redis, "
            f"aggregator, volunteer) peak {est['bytes_per_param']:.1f} bytes per parameter above an "
            f"idle {est['idle_mib']:.0f} MiB."
        )
    if any(not r.get("hwm_reset", True) for r in rows):
        lines.append("(Peak counters could not be reset: peaks are the 50 ms samples only.)")
    traced = [r for r in rows if r.get("trace")]
    if traced:  # the largest size that passed: the model dominates the process's own overhead
        lines += ["", *_trace_table(max(traced, key=lambda r: r["params"]))]
    return "\n".join(lines)


def _slice_lines(rows: list[dict[str, Any]], machine_gib: float) -> list[str]:
    """Each sliced row's volunteer peak against the whole-model row of its size and codec, and the
    largest model whose slice one ``machine_gib`` volunteer could train (from its bytes per parameter)."""
    lines: list[str] = []
    whole = {
        (r["params"], r["codec"]): r for r in rows if r["status"] == "passed" and r.get("slices", 1) == 1
    }
    for r in rows:
        if r["status"] != "passed" or r.get("slices", 1) == 1:
            continue
        base = whole.get((r["params"], r["codec"]))
        ratio = (
            f"{r['vol_above_mib'] / base['vol_above_mib']:.2f}x the whole-model shard's"
            if base
            else "no S=1 row"
        )
        per_param = r["vol_above_mib"] * MIB / r["params"]
        largest = (machine_gib * 2**30 - r["vol_idle_mib"] * MIB) / per_param
        lines.append(
            f"S = {r['slices']} at {_count(r['params'])} ({r['codec']}): volunteer peak above idle {ratio}; "
            f"{per_param:.1f} bytes per parameter, so a {machine_gib:.0f} GiB volunteer could train "
            f"one slice of a ~{_count(int(largest))}-parameter model (extrapolated)."
        )
    return ["", *lines] if lines else []


def _trace_table(row: dict[str, Any]) -> list[str]:
    lines = [f"Steps at {_count(row['params'])} parameters: RSS above idle in model sizes (x float32 model)."]
    for side, calls in row["trace"].items():
        lines += ["", f"{side}:", "", "| step | on entry | on exit | peak so far |", "|---|---:|---:|---:|"]
        for call in calls:
            mark = " (new peak inside)" if call.get("new_peak") else ""
            lines.append(
                f"| {'. ' * call['depth']}{call['step']} | {call['enter_x']:.2f} | "
                f"{call.get('exit_x', float('nan')):.2f} | {call.get('peak_x', float('nan')):.2f}{mark} |"
            )
    return lines


def _count(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: use numbers like 1e6,1e7") from None
    if not sizes or any(n < 4 for n in sizes):
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: each size must be at least 4 parameters")
    return sizes


def _codecs(text: str) -> list[str]:
    codecs = [part.strip() for part in text.split(",") if part.strip()]
    if not codecs:
        raise argparse.ArgumentTypeError(f"--compression {text!r}: name at least one codec, or default")
    for codec in codecs:
        if codec != "default":
            try:
                parse_codec(codec)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return codecs


def _slice_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slices {text!r}: use whole numbers like 1,2,4,8") from None
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"--slices {text!r}: each count must be at least 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", type=_sizes, default=_sizes(DEFAULT_SIZES), help="parameter counts, e.g. 1e6,1e7"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds per size (round 1 builds version 0 locally)")
    p.add_argument("--shards", type=int, default=1, help="shards per round (all to the one volunteer)")
    p.add_argument("--tensors", type=int, default=4, help="parameter tensors the model is split into")
    p.add_argument(
        "--slices", type=_slice_counts, default=[1], help="slice counts, e.g. 1,2,4,8 (each <= --tensors)"
    )
    p.add_argument(
        "--compression",
        type=_codecs,
        default=_codecs("none,default"),
        help="codecs to run each size with, comma-separated (none: largest deltas; default: init's)",
    )
    p.add_argument("--pool", choices=["solo", "prefork"], default="solo", help="the volunteer's Celery pool")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one command or round may take")
    p.add_argument(
        "--machine-gib", type=float, default=24.0, help="machine size for the largest-model estimate"
    )
    p.add_argument("--force", action="store_true", help="run sizes even when MemAvailable looks too small")
    p.add_argument("--trace", action="store_true", help="trace the memory-heavy steps (bench/memtrace.py)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for params in args.sizes:
        for codec in args.compression:
            for slices in args.slices:
                rows.append(measure(params, args, codec, slices))
                print(
                    f"{_count(params)} {codec} S={slices}: {rows[-1]['status']} {rows[-1].get('reason', '')}",
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        estimates = {
            codec: estimate([r for r in rows if r["codec"] == codec and r["slices"] == 1], args.machine_gib)
            for codec in args.compression
        }
        print(json.dumps({"rows": rows, "estimates": estimates}, indent=2))
    else:
        print(report(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
