"""Run every benchmark, one after another, and print their markdown tables (``make bench``).

    python bench/run_all.py [--full] [--peer-python PATH] [--only NAME ...] [--out FILE]

Default: ``codecs --quick``, ``aggregate --quick``, ``round_overhead``, ``comm_to_target`` and
``scale`` (about 10 minutes on 2 cores). ``--full`` runs the codec and aggregation benchmarks
at full size (100 MB deltas) as ``docs/BENCHMARKS.md`` reports them. ``--peer-python`` names
an interpreter with Flower installed for the peer rows; without it ``/tmp/flwr/bin/python``
is used when it exists. Each benchmark runs in its own process; one that fails is reported
and the others still run (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER = Path("/tmp/flwr/bin/python")
NAMES = ("codecs", "aggregate", "round_overhead", "comm_to_target", "scale")


def commands(full: bool, peer: str | None) -> list[tuple[str, list[str]]]:
    quick = [] if full else ["--quick"]
    peer_args = ["--peer-python", peer] if peer else []
    return [
        ("codecs", ["bench/codecs.py", *quick, *peer_args]),
        ("aggregate", ["bench/aggregate.py", *quick, *peer_args]),
        ("round_overhead", ["bench/round_overhead.py"]),
        ("comm_to_target", ["bench/comm_to_target.py"]),
        ("scale", ["bench/scale.py"]),
    ]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="full-size codec and aggregation runs")
    p.add_argument("--peer-python", default=None, help="a Python with flwr, for peer rows")
    p.add_argument("--only", action="append", choices=NAMES, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    peer = args.peer_python or (str(DEFAULT_PEER) if DEFAULT_PEER.exists() else None)
    out: list[str] = [f"# crowdtrain benchmarks\n\nMachine: {machine()}\n"]
    print(out[0], flush=True)
    failed = []
    started = time.perf_counter()
    for name, argv_ in commands(args.full, peer):
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        command = f"{Path(sys.executable).name} {' '.join(argv_)}"
        done = subprocess.run([sys.executable, *argv_], cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        section = f"## {name}\n\n`{command}` ({seconds:.0f} s)\n\n{done.stdout.strip()}\n"
        if done.returncode:
            failed.append(name)
            section += f"\n**FAILED (exit {done.returncode})**:\n\n```\n{done.stderr[-3000:]}\n```\n"
        out.append(section)
        print(section, flush=True)
    total = time.perf_counter() - started
    tail = f"Total: {total / 60:.1f} min" + (f"; failed: {', '.join(failed)}" if failed else "")
    out.append(tail)
    print(tail)
    if args.out:
        args.out.write_text("\n".join(out) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
