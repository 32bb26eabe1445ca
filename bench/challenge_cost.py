"""What a capability challenge costs each side: the trusted side's check against the volunteer's product.

Usage::

    python bench/challenge_cost.py [--sizes 256,1024,2048,4096] [--trusted-only 8192] [--repeats 3]

For each size n the volunteer's side is ``volunteer.challenge.product`` (drawing A and B,
the product on the CPU) plus the row digests of its commitment; the trusted side is
``coordinator.runs.capabilities._wrong`` on ``OPEN_ROWS`` opened rows (the digests of those
rows, all of B drawn a block at a time, B r for two vectors, a few rows of A, Freivalds'
check). ``--trusted-only`` sizes time the trusted side alone (the opened rows are computed
directly, ``A[rows] @ B``, without the whole product). CPU seconds of this process (all
threads: the work, whatever else runs on the machine), medians of ``--repeats`` runs; the
ratio is trusted over volunteer.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import challenge
from coordinator.runs.capabilities import OPEN_ROWS, _wrong
from volunteer.challenge import product


def _opened(seed: int, n: int) -> tuple[list[int], np.ndarray, bytes]:
    """Rows to open, the right rows and a commitment with their digests in place."""
    chosen = sorted(secrets.SystemRandom().sample(range(n), OPEN_ROWS))
    a = np.stack([challenge.rows(seed, challenge.MATRIX_A, n, r, r + 1)[0] for r in chosen])
    b = challenge.rows(seed, challenge.MATRIX_B, n, 0, n)
    rows = (a @ b).round().astype(np.int32)
    digests = bytearray(n * challenge.DIGEST)
    for row, values in zip(chosen, rows, strict=True):
        digests[row * challenge.DIGEST : (row + 1) * challenge.DIGEST] = challenge.row_digests(
            values[None, :]
        )
    return chosen, rows, bytes(digests)


def _trusted(seed: int, n: int) -> float:
    chosen, rows, digests = _opened(seed, n)
    started = time.process_time()
    assert _wrong(seed, n, chosen, rows, digests) is None
    return time.process_time() - started


def _volunteer(seed: int, n: int) -> float:
    started = time.process_time()
    challenge.row_digests(product(seed, n, torch.device("cpu")))
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,2048,4096")
    parser.add_argument("--trusted-only", default="8192")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'n':>6} {'volunteer cpu-s':>16} {'GFLOP/s':>8} {'trusted cpu-s':>14} {'trusted/volunteer':>18}")
    for n in [int(x) for x in args.sizes.split(",") if x]:
        volunteer = statistics.median(_volunteer(7 + i, n) for i in range(args.repeats))
        trusted = statistics.median(_trusted(7 + i, n) for i in range(args.repeats))
        gflops = 2 * n**3 / volunteer / 1e9
        print(f"{n:>6} {volunteer:>16.3f} {gflops:>8.1f} {trusted:>14.3f} {trusted / volunteer:>18.3f}")
    for n in [int(x) for x in args.trusted_only.split(",") if x]:
        trusted = statistics.median(_trusted(7 + i, n) for i in range(args.repeats))
        print(f"{n:>6} {'-':>16} {'-':>8} {trusted:>14.3f} {'-':>18}")


if __name__ == "__main__":
    main()
