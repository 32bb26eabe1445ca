"""Benchmark streaming aggregation: how fast deltas are folded in, and that memory stays flat.

    python bench/aggregate.py [--quick] [--peer-python /tmp/flwr/bin/python]

Throughput: one thread; 16 deltas of a ~25M-parameter GPT-shaped float32 model (100 MB each),
reported as GB/s of delta input consumed, beside numpy ``a += b`` over the same bytes (the
baseline: one read of each delta, like the fold itself) and, when ``--peer-python`` names an
interpreter with Flower FL installed, ``flwr.server.strategy.aggregate.aggregate`` on the same
shapes, run in a subprocess with that interpreter. Make that interpreter with:

    python -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr

The deltas are generated once and reused (four distinct ones, cycled), so the timing is the
fold, not random number generation. The fold adds into accumulators that the strategy keeps
between rounds: first-touching fresh pages runs at ~3 GB/s and would dominate (docs/BENCHMARKS.md,
"Measuring memory-bound code here"),
which the "fresh strategy" row shows. ``THP_MEM_ALLOC_ENABLE=1`` (torch's switch for
transparent huge pages) is set unless the environment sets it; run with
``THP_MEM_ALLOC_ENABLE=0`` to see the difference.

Memory: peak RSS of streaming fedavg over 8, 32 and 128 deltas of a ~5M-parameter model, each
in a fresh subprocess whose deltas are made lazily one at a time, so the growth over the
baseline is the aggregator's own: it must not grow with the number of deltas. A row that
first collects the deltas into a list shows what O(shards x model) would look like.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread, before numpy and torch load their pools
# Transparent huge pages for torch's large allocations, as numpy already asks for: 10-20%
# faster folds here (fewer TLB misses). The aggregator process should run with it too.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coordinator.merging.strategies import make_strategy  # noqa: E402

Shapes = dict[str, tuple[int, ...]]
FULL = {"model": (640, 4, 8192, 1024), "deltas": 16, "repeats": 5, "rss_model": (256, 5, 4096, 512)}
QUICK = {"model": (320, 4, 4096, 512), "deltas": 8, "repeats": 3, "rss_model": (256, 5, 4096, 512)}
RSS_COUNTS = (8, 32, 128)
DISTINCT = 4

_FLOWER = r"""
import json, os, sys, time
import numpy as np
import flwr
from flwr.server.strategy.aggregate import aggregate
shapes, count, distinct, repeats = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
pool = [[rng.standard_normal(s, dtype=np.float32) for s in shapes] for _ in range(distinct)]
results = [(pool[i % distinct], i + 1) for i in range(count)]
nbytes = count * sum(a.nbytes for a in pool[0])
best = min(
    (lambda t0: (aggregate(results), time.perf_counter() - t0)[1])(time.perf_counter())
    for _ in range(repeats)
)
print(json.dumps({"gbps": nbytes / best / 1e9, "version": flwr.__version__}))
"""


def gpt_shapes(width: int, layers: int, vocab: int, context: int) -> Shapes:
    """GPT-2-style parameter shapes: many mid-sized matrices and small vectors, like a real model."""
    shapes: Shapes = {"wte.weight": (vocab, width), "wpe.weight": (context, width)}
    for i in range(layers):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.c_attn.weight": (3 * width, width), p + "attn.c_attn.bias": (3 * width,),
            p + "attn.c_proj.weight": (width, width), p + "attn.c_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
        }  # fmt: skip
    return shapes | {"ln_f.weight": (width,), "ln_f.bias": (width,)}


def random_tensors(shapes: Shapes, seed: int) -> dict[str, torch.Tensor]:
    """One float32 delta with these shapes."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (machines are shared and noisy)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput(shapes: Shapes, count: int, repeats: int) -> list[tuple[str, float]]:
    """GB/s of delta input for numpy a+=b, a bare torch fold and crowdtrain's fedavg."""
    pool = [random_tensors(shapes, seed) for seed in range(DISTINCT)]
    nbytes = count * sum(t.numel() * 4 for t in pool[0].values())

    def stream() -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
        return ((float(i + 1), pool[i % DISTINCT]) for i in range(count))

    acc_np = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    pool_np = [{k: t.numpy() for k, t in delta.items()} for delta in pool]

    def numpy_add() -> None:
        for i in range(count):
            for key, a in acc_np.items():
                a += pool_np[i % DISTINCT][key]

    acc_t = {k: torch.zeros(s) for k, s in shapes.items()}

    def torch_fold() -> None:
        for weight, delta in stream():
            for key, a in acc_t.items():
                a.add_(delta[key], alpha=weight)

    weights = {k: torch.zeros(s) for k, s in shapes.items()}
    fedavg, clipped = make_strategy("fedavg"), make_strategy("fedavg", clip_norm=1.0)
    rows = [
        ("numpy `a += b`", numpy_add),
        ("torch `add_(alpha=w)` bare fold", torch_fold),
        ("crowdtrain fedavg (streaming)", lambda: fedavg.aggregate(weights, stream())),
        ("crowdtrain fedavg + clip_norm", lambda: clipped.aggregate(weights, stream())),
        (
            "crowdtrain fedavg, fresh strategy",
            lambda: make_strategy("fedavg").aggregate(weights, stream()),
        ),
    ]
    return [(name, nbytes / best_seconds(fn, repeats) / 1e9) for name, fn in rows]


def flower(peer_python: str, shapes: Shapes, count: int, repeats: int) -> tuple[str, float]:
    """Flower FL's aggregate() GB/s, measured with the peer interpreter in a subprocess."""
    args = json.dumps([list(shapes.values()), count, DISTINCT, repeats])
    done = subprocess.run(
        [peer_python, "-c", _FLOWER, args], capture_output=True, text=True, check=True,
        env=os.environ | {"PYTHONNOUSERSITE": "1"},
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return f"Flower FL `aggregate()` (flwr {result['version']})", float(result["gbps"])


def rss_child(model: tuple[int, int, int, int], count: int, materialize: bool) -> None:
    """Subprocess body: stream ``count`` lazily made deltas through fedavg; print RSS in MiB.

    Growth is measured from the RSS just before aggregating (weights and the delta source are
    already resident) to the process's peak RSS (VmHWM), in MiB.
    """
    torch.set_num_threads(1)
    shapes = gpt_shapes(*model)
    weights = {k: torch.zeros(s) for k, s in shapes.items()}
    base = random_tensors(shapes, 0)
    strategy = make_strategy("fedavg")
    lazy = (
        (1.0, {k: v * (1 + i / count) for k, v in base.items()}) for i in range(count)
    )  # each delta is a fresh allocation, as if just decoded from Redis
    before = _rss_now_mb()
    strategy.aggregate(weights, list(lazy) if materialize else lazy)
    model_mb = sum(t.numel() * 4 for t in weights.values()) / 2**20
    print(json.dumps({"before": before, "peak": _max_rss_mb(), "model_mb": model_mb}))


def rss_table(model: tuple[int, int, int, int]) -> list[dict[str, float]]:
    """Peak RSS of fedavg over 8, 32, 128 deltas, each in a fresh subprocess."""
    rows = []
    for count in RSS_COUNTS:
        row: dict[str, float] = {"deltas": count}
        for materialize in (False, True):
            argv = [sys.executable, __file__, "--rss-child", str(count), "--rss-model"]
            argv += [str(x) for x in model] + (["--materialize"] if materialize else [])
            out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
            key = "list" if materialize else "stream"
            row[f"{key}_peak"], row[f"{key}_growth"] = out["peak"], out["peak"] - out["before"]
            row["model_mb"] = out["model_mb"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    parser.add_argument("--peer-python", help="a Python with flwr installed, for the peer row")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss-model", type=int, nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--materialize", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is not None:
        rss_child(tuple(args.rss_model), args.rss_child, args.materialize)
        return 0
    torch.set_num_threads(1)
    config = QUICK if args.quick else FULL
    shapes = gpt_shapes(*config["model"])
    params = sum(int(np.prod(s)) for s in shapes.values())
    count, repeats = config["deltas"], config["repeats"]
    rows = throughput(shapes, count, repeats)
    if args.peer_python:
        rows.append(flower(args.peer_python, shapes, count, repeats))
    base = rows[0][1]
    peer = rows[-1][1] if args.peer_python else None
    print(f"## Streaming aggregation: {count} deltas of {params / 1e6:.1f}M float32 params "
          f"({params * 4 / 1e6:.0f} MB each), 1 thread, best of {repeats}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}\n")  # fmt: skip
    print("| operation | GB/s of delta input | vs numpy `a += b` | vs Flower FL |")
    print("|---|---:|---:|---:|")
    for name, gbps in rows:
        versus = f"{gbps / peer:.2f}x" if peer else "n/a"
        print(f"| {name} | {gbps:.2f} | {gbps / base:.2f}x | {versus} |")
    fedavg = rows[2][1]
    verdict = f"\nfedavg {fedavg / base:.2f}x numpy (goal >= 0.6x)"
    print(verdict + (f", {fedavg / peer:.2f}x Flower FL (goal >= 2x)" if peer else ""))
    rss = rss_table(config["rss_model"])
    print(f"\n## Peak RSS of streaming fedavg ({rss[0]['model_mb']:.0f} MiB model), "
          "fresh subprocess each\n")  # fmt: skip
    print("| deltas | peak RSS MiB | growth over baseline MiB | if collected in a list: growth MiB |")
    print("|---:|---:|---:|---:|")
    for row in rss:
        print(f"| {row['deltas']:.0f} | {row['stream_peak']:.0f} | {row['stream_growth']:.0f} "
              f"| {row['list_growth']:.0f} |")  # fmt: skip
    spread = max(r["stream_peak"] for r in rss) - min(r["stream_peak"] for r in rss)
    print(f"\nstreaming peak spread across {RSS_COUNTS}: {spread:.0f} MiB "
          f"({spread / rss[0]['model_mb']:.2f}x the model; flat means well under 1x)")  # fmt: skip
    return 0


def _max_rss_mb() -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (kept across exec).
    return _status_kib("VmHWM") / 1024


def _rss_now_mb() -> float:
    return _status_kib("VmRSS") / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


if __name__ == "__main__":
    raise SystemExit(main())
