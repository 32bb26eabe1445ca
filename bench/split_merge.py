"""Aggregator memory per merge task of a sliced round shared among aggregators.

    python bench/split_merge.py [--params 5e7] [--slices 2,4,8] [--json]

For each S a fresh run of ``bench/memory_job.py`` (``--params`` float32 values in 16
tensors, ``init --slices S --shards S --compression none --verify none``, fedavgm so the
strategy state is read and staged too) gets one round whose S uploads (one per slice,
seeded values, written and validated as a volunteer's are) the benchmark records as the
round's merge plan, as a planner would, without merging anything. Then a fresh process,
an ``Aggregator`` whose run context is built (as an aggregator's intake builds it) and
whose freed memory is given back (``malloc_trim``), resets its peak (``clear_refs``) and
runs ``merge_slices``, the task a second aggregator runs: it takes every slice in turn,
one task's worth at a time. Its peak RSS above that idle level is the figure, against
the slice's float32 bytes and the model's. For comparison, a run of S = 4 is merged by
one aggregator alone (``Aggregator.aggregate``: it plans, merges every slice, evaluates
and stages the whole version), measured the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Cluster

JOB = "bench.memory_job:make_job"
TENSORS = 16
MIB = 1 << 20

# The measured process: argv = broker URL, home, run, "slices" | "round".
CHILD = r"""
import ctypes, gc, json, sys
from pathlib import Path
from broker.client import redis_client
from broker.settings import Settings
from coordinator.merging.aggregator import Aggregator
from coordinator.store import Store

url, home, run, what = sys.argv[1:5]
store = Store(redis_client(Settings(broker_url=url)))
aggregator = Aggregator(store, Path(home), name="bench-helper")
aggregator.contexts[run]
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")
idle = kib("VmRSS")
done = aggregator.merge_slices(run, 1) if what == "slices" else aggregator.aggregate(run, 1)
print(json.dumps({"idle_kib": idle, "peak_kib": kib("VmHWM"), "done": bool(done)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=5e7)
    parser.add_argument("--slices", default="2,4,8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    params = int(args.params)
    rows = []
    with Cluster("split-merge") as cluster:
        for count in [int(s) for s in args.slices.split(",")]:
            run = f"s{count}"
            _round(cluster, run, params, count, plan=True)
            rows.append({"slices": count, "task": "merge_slices", **_measure(cluster, run, "slices")})
        _round(cluster, "whole", params, 4, plan=False)
        rows.append({"slices": 4, "task": "aggregate (alone)", **_measure(cluster, "whole", "round")})
    model = 4 * params
    for row in rows:
        row["slice_mib"] = round(model / row["slices"] / MIB, 1)
        row["above_idle_mib"] = round((row["peak_kib"] - row["idle_kib"]) / 1024, 1)
        row["x_slice"] = round(row["above_idle_mib"] / row["slice_mib"], 2)
        row["x_model"] = round(row["above_idle_mib"] * MIB / model, 2)
    if args.json:
        print(json.dumps({"params": params, "rows": rows}, indent=2))
        return
    print(f"model: {params:,} float32 parameters = {model / MIB:.0f} MiB, {TENSORS} tensors, fedavgm")
    print(f"{'S':>2} {'task':<18} {'slice MiB':>9} {'peak above idle MiB':>20} {'x slice':>8} {'x model':>8}")
    for r in rows:
        print(
            f"{r['slices']:>2} {r['task']:<18} {r['slice_mib']:>9} {r['above_idle_mib']:>20} "
            f"{r['x_slice']:>8} {r['x_model']:>8}"
        )


def _round(cluster: Cluster, run: str, params: int, count: int, plan: bool) -> None:
    """A run whose round 1 has one validated upload per slice; with ``plan`` its merge plan recorded."""
    import torch

    from broker import blobs, keys
    from coordinator.merging import split
    from coordinator.merging.aggregator import Aggregator
    from coordinator.rounds.leases import Request
    from coordinator.store import Store
    from serialization import dumps_stream, loads

    flags = ["--job-arg", f"params={params}", "--job-arg", f"tensors={TENSORS}", "--slices", str(count)]
    flags += ["--shards", str(count), "--strategy", "fedavgm", "--compression", "none", "--verify", "none"]
    cluster.coordinator("init", "--run", run, "--job", JOB, *flags, "--deadline", "3600")
    cluster.coordinator("post-round", "--run", run)
    store = Store(cluster.client)
    trusted = Aggregator(store, cluster.dir / "home")
    shapes = {k: v.shape for k, v in loads(store.model_blob(run, 0))[0].items()}
    slices = store.run_config(run).slice_tensors
    parts = []
    for shard in range(count):
        volunteer, token = f"{run}-v{shard}", uuid.uuid4().hex
        assert trusted.leases.answer([Request(volunteer, "lease", run, 1, shard, token)]) == ["granted"]
        generator = torch.Generator().manual_seed(shard)
        delta = {name: torch.randn(shapes[name], generator=generator) * 1e-3 for name in slices[shard]}
        meta = {"run": run, "round": 1, "shard": shard, "base_version": 0, "samples": 8, "slice": shard}
        meta |= {"train_loss": 1.0, "downlink": 0}
        blobs.write(store.redis, keys.upload(volunteer, run, 1, shard, token), dumps_stream(delta, meta))
        del delta
        verdict = trusted.validate(run, 1, shard, token, volunteer)
        assert verdict.outcome == "accepted", verdict
        kept = keys.accepted_upload(run, 1, volunteer, shard, token)
        parts.append(split.Part(shard, (split.Voice(volunteer, 8.0, (split.Shard(shard, kept, 8, 0),)),)))
    if plan:  # as the planner records it, with the round claimed by a planner that merges nothing
        owner = f"bench-planner:{uuid.uuid4().hex}"
        assert store.rounds.claim(run, 1, owner, lease=3600) == "claimed"
        split.SplitMerges(store.redis).record(run, 1, split.MergePlan(uuid.uuid4().hex, 0, tuple(parts)))


def _measure(cluster: Cluster, run: str, what: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, cluster.url, str(cluster.dir / "home"), run, what],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"the measured process failed: {done.stderr[-2000:]}")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["done"], result
    return result


if __name__ == "__main__":
    main()
