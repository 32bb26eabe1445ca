"""Block-local top-k selects with scratch of a few percent of the tensor, whatever its values.

A sparse tensor (an aggregator's merged top-k deltas: most entries exactly 0) makes
the sampled threshold 0, so every entry passes the candidate test; the candidates of
such rows must not be kept (int64 positions and float32 magnitudes of the whole tensor,
about 8x its size, were at an aggregator's peak).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from serialization import kernels

N = 4 * 1024 * 1024  # 16 MiB of float32: the candidate path (more than one CHUNK of rows)


def _sparse(seed: int, nonzero: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros(N, np.float32)
    hit = rng.random(N) < nonzero
    x[hit] = rng.standard_normal(int(hit.sum())).astype(np.float32)
    return x


def _exact(x: np.ndarray, k_full: int, k_tail: int) -> np.ndarray:
    full = x.size // kernels.TOPK_BLOCK * kernels.TOPK_BLOCK
    head = kernels._exact_rows(x[:full].reshape(-1, kernels.TOPK_BLOCK), k_full)
    head += (np.arange(head.shape[0], dtype=np.int64) * kernels.TOPK_BLOCK)[:, None]
    return head.reshape(-1)


@pytest.mark.parametrize("nonzero", [0.0, 0.002, 0.01, 0.5])
def test_sparse_tensors_select_exactly_with_a_few_percent_of_scratch(nonzero):
    x = _sparse(int(nonzero * 1000), nonzero)
    _, k_full, k_tail = kernels.block_topk_counts(0.01, x.size)
    tracemalloc.start()
    try:
        chosen = kernels.select_block_topk(x, k_full, k_tail)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(chosen, _exact(x, k_full, k_tail))
    # the answer is k int64 per 4096 floats (2%); with the steps' buffers, under half the tensor
    assert peak < 0.5 * x.nbytes, f"selection scratch {peak / x.nbytes:.2f}x the tensor"
