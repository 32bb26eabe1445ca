"""Numpy kernels behind the lossy codecs, written to stay in cache.

Each kernel walks its input in chunks of ``CHUNK`` elements (256 KiB of
float32) and runs every step of a chunk before moving on, so the memory
traffic is one read of the input and one write of the output (ANCHORS.md:
multi-pass code leaves most of the bandwidth unused). Scratch buffers are
allocated once per call, not per chunk.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import WireFormatError

__all__ = [
    "BLOCK",
    "CHUNK",
    "INDEX_BLOCK",
    "dequantize_int8",
    "pack_indices",
    "quantize_int8",
    "select_topk",
    "unpack_indices",
]

BLOCK = 256  # int8: elements sharing one float32 absmax scale
CHUNK = 1 << 16  # elements per cache-resident step; a multiple of BLOCK
INDEX_BLOCK = 1 << 16  # top-k: indices are stored as uint16 offsets inside such blocks
_SAMPLE = 1 << 16  # top-k: |x| sample used to guess the threshold
_RNG = np.random.default_rng(0x5EED)  # sample positions only; the result does not depend on them


def quantize_int8(
    x: np.ndarray, q: np.ndarray | None = None, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax int8: q = rint(x * 127 / absmax(block)), scale = absmax / 127."""
    n = x.size
    q = np.empty(n, np.int8) if q is None else q
    scale = np.empty(-(-n // BLOCK), "<f4") if scale is None else scale
    work = np.empty(CHUNK, np.float32)
    amax = np.empty(CHUNK // BLOCK, np.float32)
    full = n // BLOCK * BLOCK
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, full, CHUNK):
            stop = min(start + CHUNK, full)
            _quantize_blocks(x[start:stop], q[start:stop], scale[start // BLOCK : stop // BLOCK], work, amax)
        if full < n:
            tail = np.zeros(BLOCK, np.float32)
            tail[: n - full] = x[full:]
            qt = np.empty(BLOCK, np.int8)
            _quantize_blocks(tail, qt, scale[-1:], work, amax)
            q[full:] = qt[: n - full]
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write q * scale (per block) into the float32 ``out``; one fused pass per chunk."""
    n = q.size
    full = n // BLOCK * BLOCK
    for start in range(0, full, CHUNK):
        stop = min(start + CHUNK, full)
        np.multiply(
            q[start:stop].reshape(-1, BLOCK),
            scale[start // BLOCK : stop // BLOCK, None],
            out=out[start:stop].reshape(-1, BLOCK),
        )
    if full < n:
        np.multiply(q[full:], scale[-1], out=out[full:])
    return out


def select_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest |x| (ties: lowest index first), exactly k of them."""
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, np.int64)
    cand = _candidates(x, k) if n > 4 * _SAMPLE else None
    if cand is None or cand.size < k:
        cand = np.arange(n, dtype=np.int64)
    mag = np.abs(x[cand])
    pivot = np.partition(mag, cand.size - k)[cand.size - k]
    keep = mag > pivot
    short = k - int(np.count_nonzero(keep))
    if short > 0:
        keep[np.flatnonzero(mag == pivot)[:short]] = True
        short = k - int(np.count_nonzero(keep))
    if short > 0:  # NaN pivot: fill with the lowest unused indices so exactly k go out
        keep[np.flatnonzero(~keep)[:short]] = True
    return cand[keep]


def pack_indices(idx: np.ndarray, n: int, low: np.ndarray, counts: np.ndarray) -> None:
    """Sorted indices -> uint16 offsets within 65536-blocks and a uint32 count per block."""
    np.bitwise_and(idx, 0xFFFF, out=low, casting="unsafe")
    np.copyto(counts, np.bincount(idx >> 16, minlength=-(-n // INDEX_BLOCK)), casting="unsafe")


def unpack_indices(low: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """Inverse of pack_indices, validating that every index lies inside [0, n)."""
    nblocks = counts.size
    sizes = np.full(nblocks, INDEX_BLOCK, np.int64)
    if nblocks:
        sizes[-1] = n - (nblocks - 1) * INDEX_BLOCK
    counts64 = counts.astype(np.int64)
    if np.any(counts64 > sizes):
        raise WireFormatError("top-k block count exceeds the block size")
    if int(counts64.sum()) != low.size:
        raise WireFormatError(
            f"top-k block counts add up to {int(counts64.sum())}, not to the {low.size} indices sent"
        )
    starts = np.arange(nblocks, dtype=np.int64) * INDEX_BLOCK
    idx = np.repeat(starts, counts64) + low
    if idx.size and nblocks and low[idx.size - int(counts64[-1]) :].max(initial=0) >= sizes[-1]:
        raise WireFormatError("top-k index out of range")
    return idx


def topk_count(fraction: float, n: int) -> int:
    """How many entries top-k sends for n elements: round(F*n), at least 1 when n > 0."""
    return 0 if n == 0 else min(n, max(1, round(fraction * n)))


def _quantize_blocks(
    x: np.ndarray, q: np.ndarray, scale: np.ndarray, work: np.ndarray, amax: np.ndarray
) -> None:
    """Quantize whole blocks of one chunk with scratch ``work`` / ``amax``."""
    nb = x.size // BLOCK
    w, a = work[: x.size].reshape(nb, BLOCK), amax[:nb]
    np.abs(x.reshape(nb, BLOCK), out=w)
    np.max(w, axis=1, out=a)
    np.multiply(a, 1.0 / 127.0, out=scale)
    np.maximum(a, 1e-30, out=a)
    np.divide(127.0, a, out=a)
    np.multiply(x.reshape(nb, BLOCK), a[:, None], out=w)
    np.rint(w, out=w)
    np.copyto(q.reshape(nb, BLOCK), w, casting="unsafe")


def _candidates(x: np.ndarray, k: int) -> np.ndarray | None:
    """Indices with |x| above a threshold guessed from a sample to hold a few more than k."""
    n = x.size
    sample = np.abs(x[_RNG.integers(0, n, _SAMPLE)])
    expect = _SAMPLE * k / n
    above = min(_SAMPLE - 1, int(expect * 1.1 + 4 * math.sqrt(expect) + 16))
    threshold = np.partition(sample, _SAMPLE - 1 - above)[_SAMPLE - 1 - above]
    if not np.isfinite(threshold):
        return None
    work = np.empty(CHUNK, np.float32)
    mask = np.empty(CHUNK, np.bool_)
    found = []
    for start in range(0, n, CHUNK):
        part = x[start : start + CHUNK]
        w, m = work[: part.size], mask[: part.size]
        np.abs(part, out=w)
        np.greater_equal(w, threshold, out=m)
        hits = np.flatnonzero(m)
        if hits.size:
            found.append(hits + start)
    return np.concatenate(found) if found else np.empty(0, np.int64)
