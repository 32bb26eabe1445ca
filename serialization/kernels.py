"""Numpy kernels behind the lossy codecs, written to stay in cache.

Each kernel walks its input in chunks of ``CHUNK`` elements (256 KiB of
float32) and runs every step of a chunk before moving on, so the memory
traffic is one read of the input and one write of the output (a single-pass
int8 kernel measured ~3.2 GB/s where multi-pass torch code left most of the
bandwidth unused). Scratch buffers are allocated once per call, not per chunk.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import WireFormatError

__all__ = [
    "BLOCK",
    "CHUNK",
    "INDEX_BLOCK",
    "TOPK_BLOCK",
    "block_positions",
    "block_topk_counts",
    "dequantize_int8",
    "dequantize_lowbit",
    "pack_bits",
    "pack_indices",
    "pack_offsets12",
    "quantize_int8",
    "quantize_lowbit",
    "select_block_topk",
    "select_topk",
    "unpack_bits",
    "unpack_indices",
    "unpack_offsets12",
]

BLOCK = 256  # int8: elements sharing one float32 absmax scale
CHUNK = 1 << 16  # elements per cache-resident step; a multiple of BLOCK
INDEX_BLOCK = 1 << 16  # top-k: indices are stored as uint16 offsets inside such blocks
_BLOCK_BITS = 12
TOPK_BLOCK = 1 << _BLOCK_BITS  # block-local top-k: each block keeps its own k; offsets fit in 12 bits
_SAMPLE = 1 << 16  # top-k: |x| sample used to guess the threshold
_BLOCK_STRIDE = 16  # block-local top-k: every 16th |x| of a block guesses its threshold
_CANDIDATE_STEP = 4 * CHUNK  # block-local top-k: elements per candidate step (measured fastest)
_FIT_STEPS = 4  # low-bit values: Lloyd steps per start fitting a block's scale (converged by then)
_RMS_START = {2: 0.67, 4: 0.34}  # low-bit values: second start of the scale, as a multiple of the RMS
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


def block_topk_counts(fraction: float, n: int) -> tuple[int, int, int]:
    """Block-local top-k of n elements: (full blocks, entries kept per full block, kept from the tail)."""
    return n // TOPK_BLOCK, topk_count(fraction, TOPK_BLOCK), topk_count(fraction, n % TOPK_BLOCK)


def select_block_topk(x: np.ndarray, k_full: int, k_tail: int) -> np.ndarray:
    """Sorted indices of the k_full largest |x| of each full TOPK_BLOCK block, then k_tail of the tail.

    Exactly that many per block (ties: lowest index first; NaN counts as
    largest). Large inputs guess each block's threshold from every 16th |x|,
    then select exactly among the entries at or above it; blocks where the
    guess leaves too few or too many go the exact way.
    """
    nfull = x.size // TOPK_BLOCK
    full = nfull * TOPK_BLOCK
    head = _topk_rows(x[:full].reshape(nfull, TOPK_BLOCK), k_full)
    head += (np.arange(nfull, dtype=np.int64) * TOPK_BLOCK)[:, None]
    tail = _exact_rows(x[full:].reshape(1, -1), k_tail) + full if k_tail else np.empty((0, 0), np.int64)
    return np.concatenate((head.reshape(-1), tail.reshape(-1)))


def block_positions(offsets: np.ndarray, nfull: int, k_full: int, n: int) -> np.ndarray:
    """Indices in [0, n) of received block offsets, refusing ones that repeat or fall outside."""
    idx = offsets.astype(np.int64)
    head, tail = _per_block(idx, nfull, k_full)
    for rows in (head, tail):
        if rows.shape[1] > 1 and np.any(rows[:, 1:] <= rows[:, :-1]):
            raise WireFormatError("top-k offsets must increase within each block")
    if tail.size and tail[0, -1] >= n % TOPK_BLOCK:
        raise WireFormatError("top-k offset out of range in the last block")
    head += (np.arange(nfull, dtype=np.int64) * TOPK_BLOCK)[:, None]
    tail += nfull * TOPK_BLOCK
    return idx


def quantize_lowbit(
    values: np.ndarray, nfull: int, k_full: int, bits: int, codes: np.ndarray, scale: np.ndarray
) -> None:
    """Per block: code = clip(floor(v / s), -h, h - 1) + h, h = 2**(bits-1), s least-squares fitted.

    The level of a code is (code - h + 0.5) * s. s comes from Lloyd steps
    (assign codes, refit s) from two starts, the top level at the block's
    absmax and s a fixed multiple of its RMS; the start with the smaller
    squared error wins (the first suits few, spread values; the second many,
    concentrated ones). Codes are assigned against s as sent (float32).
    """
    half = 1 << (bits - 1)
    blocks = zip(
        _per_block(values, nfull, k_full), _per_block(codes, nfull, k_full), (scale[:nfull], scale[nfull:])
    )
    with np.errstate(all="ignore"):  # 0/0 on all-zero blocks, inf/NaN inputs: clipped, never raised
        for v, q, s in blocks:
            if not v.size:
                continue
            peak = np.max(np.abs(v), axis=1)
            unit = v / np.where(peak > 0, peak, 1)[:, None]  # fitted in [-1, 1]: float32 cannot overflow
            starts = np.full(peak.size, 1 / (half - 0.5), np.float32), _RMS_START[bits] * _row_norm(unit)
            fit, error = _fit_scale(np.concatenate((unit, unit)), np.concatenate(starts), half)
            rows = np.arange(peak.size)
            best = np.where(error[peak.size :] < error[: peak.size], rows + peak.size, rows)
            np.multiply(fit[best], peak, out=s)
            np.add(_level_index(v, s, half), half, out=q, casting="unsafe")


def dequantize_lowbit(
    codes: np.ndarray, nfull: int, k_full: int, bits: int, scale: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Inverse of quantize_lowbit: out = (code - h + 0.5) * s, one float32 product per entry."""
    half = 1 << (bits - 1)
    np.take((np.arange(2 * half) - (half - 0.5)).astype(np.float32), codes, out=out)
    for rows, s in zip(_per_block(out, nfull, k_full), (scale[:nfull], scale[nfull:])):
        if rows.size:
            np.multiply(rows, s[:, None], out=rows)
    return out


def pack_bits(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Codes of ``bits`` (2 or 4) bits, first code in the low bits of each byte; ceil(k*bits/8) bytes."""
    per = 8 // bits
    padded = np.zeros(out.size * per, np.uint8)
    padded[: codes.size] = codes
    rows = padded.reshape(-1, per)
    np.copyto(out, rows[:, 0])
    for i in range(1, per):
        out |= rows[:, i] << (bits * i)


def unpack_bits(data: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The first k codes of pack_bits' bytes."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((data[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:k]


def pack_offsets12(offsets: np.ndarray, out: np.ndarray) -> None:
    """12-bit offsets, two per 3 bytes (a, b -> a & 255, a >> 8 | (b & 15) << 4, b >> 4); ceil(1.5k) bytes."""
    pairs = np.zeros(2 * -(-offsets.size // 2), np.uint16)
    pairs[: offsets.size] = offsets
    a, b = pairs[0::2], pairs[1::2]
    packed = np.empty((a.size, 3), np.uint8)
    packed[:, 0] = a & 0xFF
    packed[:, 1] = (a >> 8) | ((b & 0xF) << 4)
    packed[:, 2] = b >> 4
    np.copyto(out, packed.reshape(-1)[: out.size])


def unpack_offsets12(data: np.ndarray, k: int) -> np.ndarray:
    """The k offsets of pack_offsets12's bytes, as uint16."""
    packed = np.zeros(3 * -(-k // 2), np.uint8)
    packed[: data.size] = data
    t = packed.reshape(-1, 3).astype(np.uint16)
    pairs = np.empty(2 * t.shape[0], np.uint16)
    pairs[0::2] = t[:, 0] | ((t[:, 1] & 0xF) << 8)
    pairs[1::2] = (t[:, 1] >> 4) | (t[:, 2] << 4)
    return pairs[:k]


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


def _per_block(a: np.ndarray, nfull: int, k_full: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-entry array as views (full blocks x k_full) and (1 x tail entries)."""
    head = nfull * k_full
    return a[:head].reshape(nfull, k_full), a[head:].reshape(1, -1)


def _level_index(v: np.ndarray, scale: np.ndarray, half: int, out: np.ndarray | None = None) -> np.ndarray:
    """floor(v / scale) per row, clipped to [-half, half - 1] (NaN to -half)."""
    index = np.divide(v, scale[:, None], out=out)
    np.floor(index, out=index)
    np.fmax(index, -half, out=index)
    return np.fmin(index, half - 1, out=index)


def _fit_scale(unit: np.ndarray, scale: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """_FIT_STEPS Lloyd steps from ``scale``: each row's refitted scale and its squared error."""
    level = np.empty_like(unit)
    for _ in range(_FIT_STEPS):
        _level_index(unit, scale, half, out=level)
        level += 0.5
        scale = np.einsum("ij,ij->i", unit, level) / np.einsum("ij,ij->i", level, level)
    _level_index(unit, scale, half, out=level)
    level += 0.5
    level *= scale[:, None]
    level -= unit
    return scale, np.einsum("ij,ij->i", level, level)


def _row_norm(rows: np.ndarray) -> np.ndarray:
    """RMS of each row."""
    return np.sqrt(np.einsum("ij,ij->i", rows, rows) / rows.shape[1])


def _topk_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """Sorted column indices of the k largest |x| of each TOPK_BLOCK-wide row (as _exact_rows)."""
    nrows = rows.shape[0]
    if k * 8 > TOPK_BLOCK or nrows * TOPK_BLOCK <= CHUNK:
        return _exact_rows(rows, k)
    hits, mag, counts, good = _row_candidates(rows, k)
    out = np.empty((nrows, k), np.int64)
    bad = np.flatnonzero(~good)
    if bad.size:  # the sampled guess left too few or too many: select these rows exactly
        step = _CANDIDATE_STEP // TOPK_BLOCK  # rows copied a step at a time, not all bad rows at once
        for start in range(0, bad.size, step):
            some = bad[start : start + step]
            out[some] = _exact_rows(rows[some], k)
        counts = counts[good]
    # Candidates into a (rows x most candidates) matrix, padded with -1 (below every |x|).
    starts = np.cumsum(counts) - counts
    width = int(counts.max(initial=k))
    padded = np.full((counts.size, width), -1.0, np.float32)
    padded.reshape(-1)[np.repeat(np.arange(counts.size) * width - starts, counts) + np.arange(hits.size)] = (
        mag
    )
    chosen = np.empty((counts.size, k), np.int64)
    step = max(1, CHUNK // width)
    for start in range(0, counts.size, step):
        chosen[start : start + step] = _top_columns(padded[start : start + step], k)
    chosen += starts[:, None]
    out[good] = hits[chosen] & (TOPK_BLOCK - 1)
    return out


def _row_candidates(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat positions and |x| (NaN as inf) of the entries at or above a per-row threshold guessed
    to leave a few more than k, the count per row, and which rows the guess fits: at least k
    and at most the count beyond which exact selection is cheaper. Only fitting rows keep their
    candidates, so the scratch stays a few percent of the rows whatever the data (a sparse
    tensor, whose guessed threshold is 0, would otherwise make every entry a candidate)."""
    nrows, width = rows.shape
    per, sample = _CANDIDATE_STEP // width, width // _BLOCK_STRIDE
    expect = sample * k / width
    above = min(sample - 1, int(expect + 2 * math.sqrt(expect) + 1))
    cap = 2 * (above + 1) * _BLOCK_STRIDE
    work = np.empty((per, width), np.float32)
    mask = np.empty((per, width), np.bool_)
    counts = np.empty(nrows, np.int64)
    found, mags = [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    for start in range(0, nrows, per):
        stop = min(start + per, nrows)
        w, m = work[: stop - start], mask[: stop - start]
        np.abs(rows[start:stop], out=w)
        threshold = np.partition(w[:, ::_BLOCK_STRIDE], sample - 1 - above, axis=1)[:, sample - 1 - above]
        np.less(w, threshold[:, None], out=m)
        np.logical_not(m, out=m)  # NaN passes: it counts as largest, as in _exact_rows
        counts[start:stop] = np.count_nonzero(m, axis=1)
        misfit = (counts[start:stop] < k) | (counts[start:stop] > cap)
        if misfit.any():
            m[misfit] = False  # these rows go the exact way: keep none of their candidates
        hits = np.flatnonzero(m)
        found.append(hits + start * width)
        mags.append(w.reshape(-1)[hits])
    hits, mag = np.concatenate(found), np.concatenate(mags)
    mag[np.isnan(mag)] = np.inf
    return hits, mag, counts, (counts >= k) & (counts <= cap)


def _exact_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """Sorted column indices of the k largest |x| of each row (NaN counts as largest)."""
    nrows, width = rows.shape
    out = np.empty((nrows, k), np.int64)
    step = max(1, CHUNK // max(width, 1))
    for start in range(0, nrows, step):
        mag = np.abs(rows[start : start + step])
        mag[np.isnan(mag)] = np.inf
        out[start : start + step] = _top_columns(mag, k)
    return out


def _top_columns(mag: np.ndarray, k: int) -> np.ndarray:
    """Sorted columns of the k largest of each row of a NaN-free matrix (ties: lowest column first)."""
    width = mag.shape[1]
    pivot = np.partition(mag, width - k, axis=1)[:, width - k, None]
    take = mag > pivot
    tie = mag == pivot
    short = k - np.count_nonzero(take, axis=1)
    if np.array_equal(np.count_nonzero(tie, axis=1), short):
        take |= tie  # no tie to break (the usual case)
    else:
        take |= tie & (np.cumsum(tie, axis=1, dtype=np.int32) <= short[:, None])
    return np.nonzero(take)[1].reshape(-1, k)
