"""The wire format's ``none`` path beside memcpy and Flower, interleaved in one process.

Usage::

    python bench/wire_none.py [--quick] [--rounds N] [--cpu-time] [--flwr-site DIR] [--baseline DIR]

``bench/codecs.py`` times each method best-of-N one after another and Flower
in another process, so on a shared machine its ratios move with the load of
the moment. Here every round times each method once, in a rotating order,
on the same GPT-shaped float32 delta (``bench/codecs.py``'s), one thread; the
figures are medians over rounds and each ratio is the median of its per-round
ratios, so a burst of load slows both sides of a ratio alike. ``--cpu-time``
times this thread's CPU time (user + system, page faults included) instead of
the wall clock, which leaves out the time other processes hold the core: on an
oversubscribed machine it is the steadier of the two (memory bandwidth is still
shared).

Flower's own ``ndarrays_to_parameters`` / ``parameters_to_ndarrays`` are
imported from the site-packages of a virtualenv with flwr (``--flwr-site``,
default ``/tmp/flwr``'s, as in docs/BENCHMARKS.md), with this process's numpy.
``--baseline DIR`` also times the ``serialization`` package of another
checkout (for example ``git worktree add /tmp/base HEAD~3``) in the same rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serialization  # noqa: E402


def _load(name: str, path: Path, package: bool = False) -> ModuleType:
    """Import a file (or a package folder) under a name of our choosing."""
    init = path / "__init__.py" if package else path
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(path)] if package else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def flower(site: Path | None) -> tuple[Callable, Callable] | None:
    """Flower's two conversion functions, or None where flwr cannot be imported."""
    if site is None:
        found = sorted(Path("/tmp/flwr/lib").glob("python*/site-packages"))
        site = found[-1] if found else None
    if site is not None:
        sys.path.append(str(site))  # after ours: this process's numpy and torch stay first
    try:
        from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
    except ImportError:
        try:
            from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        except ImportError:
            return None
    return ndarrays_to_parameters, parameters_to_ndarrays


def methods(
    delta: dict[str, torch.Tensor], flwr: tuple[Callable, Callable] | None, baseline: ModuleType | None
) -> dict[str, Callable[[], object]]:
    """name -> a call to time; decoders get the bytes their encoder made."""
    flat = np.concatenate([v.numpy().ravel() for v in delta.values()])
    dst = np.empty_like(flat)
    dst.fill(0)
    out: dict[str, Callable[[], object]] = {"memcpy": lambda: np.copyto(dst, flat)}
    packages = {"crowdtrain": serialization, **({"baseline": baseline} if baseline else {})}
    for label, package in packages.items():
        data = package.dumps(delta, {"round": 1}, "none")
        out[f"{label} none enc"] = lambda p=package: p.dumps(delta, {"round": 1}, "none")
        out[f"{label} none dec"] = lambda p=package, d=data: p.loads(d)
        out[f"{label} fp16 enc"] = lambda p=package: p.dumps(delta, {"round": 1}, "fp16")
    if flwr is not None:
        to_parameters, to_ndarrays = flwr
        arrays = [v.numpy() for v in delta.values()]
        parameters = to_parameters(arrays)
        out["Flower enc"] = lambda: to_parameters(arrays)
        out["Flower dec"] = lambda: to_ndarrays(parameters)
    return out


def measure(
    calls: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds of each call in each round; the order rotates from round to round."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            result = calls[name]()
            times[name].append(clock() - start)
            del result
    return times


def report(times: dict[str, list[float]], nbytes: int) -> str:
    """Median GB/s of each call, then the goal ratios as medians of per-round ratios."""
    lines = ["| call | median ms | GB/s of float32 input |", "|---|---:|---:|"]
    for name, seconds in times.items():
        med = statistics.median(seconds)
        lines.append(f"| {name} | {med * 1e3:.2f} | {nbytes / med / 1e9:.2f} |")

    def ratio(num: list[str], den: list[str]) -> float:
        per_round = zip(*(times[n] for n in num), *(times[d] for d in den), strict=True)
        return statistics.median(sum(t[len(num) :]) / sum(t[: len(num)]) for t in per_round)

    lines.append("")
    for label in [p for p in ("crowdtrain", "baseline") if f"{p} none enc" in times]:
        lines.append(f"- {label} none encode / memcpy: {ratio([f'{label} none enc'], ['memcpy']):.2f}")
        lines.append(f"- {label} fp16 encode / memcpy: {ratio([f'{label} fp16 enc'], ['memcpy']):.2f}")
        if "Flower enc" in times:
            both = ratio([f"{label} none enc", f"{label} none dec"], ["Flower enc", "Flower dec"])
            lines.append(
                f"- {label} none enc+dec / Flower: {both:.2f} (goal >= 2) {'OK' if both >= 2 else 'MISSED'}"
            )
    if "baseline none enc" in times:
        speedup = ratio(
            ["crowdtrain none enc", "crowdtrain none dec"], ["baseline none enc", "baseline none dec"]
        )
        lines.append(f"- none enc+dec, this checkout / baseline: {speedup:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, measure, print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 6.4M-parameter delta (default 25.1M)")
    parser.add_argument("--rounds", type=int, default=21, help="rounds; each times every call once")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU time, not the wall clock")
    parser.add_argument("--flwr-site", type=Path, default=None, metavar="DIR")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR", help="another checkout")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gpt_delta = _load("bench_codecs", ROOT / "bench" / "codecs.py").gpt_delta
    delta = gpt_delta(args.quick)
    baseline = (
        _load("baseline_serialization", args.baseline / "serialization", True) if args.baseline else None
    )
    flwr = flower(args.flwr_site)
    nbytes = sum(v.numel() * 4 for v in delta.values())
    clock = time.thread_time if args.cpu_time else time.perf_counter
    times = measure(methods(delta, flwr, baseline), args.rounds, clock)
    print(
        f"delta: {nbytes / 4e6:.1f}M float32 parameters in {len(delta)} tensors, 1 thread, "
        f"median of {args.rounds} interleaved rounds, {'CPU' if args.cpu_time else 'wall'} time; "
        f"Flower {'measured' if flwr else 'not found'}\n"
    )
    print(report(times, nbytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
