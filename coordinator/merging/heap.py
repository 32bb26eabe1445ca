"""Giving the memory a round freed back to the operating system (glibc's ``malloc_trim``).

A round allocates and frees models' worth of tensors: the probe's model and each
decoded delta while judging, the merge's sum and copy after it. Tensors under
glibc's dynamic mmap threshold (it rises to 32 MiB as large blocks are freed) come
from the heap, and freed heap pages stay with the process, so memory judging freed
was not there for the merge to reuse (a 50M-parameter charlm at 8 voices: 4.47x the
model above the aggregator's start, 4.22x with the heap trimmed after judging, as
measured before the merge stopped holding two deltas; docs/BENCHMARKS.md section 26).
Trimming costs a few milliseconds; on a C library without ``malloc_trim`` (musl,
macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def give_back() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
