"""Output buffers that skip the page-fault cost of fresh large allocations.

A new 100 MB buffer spends most of its filling time faulting in 4 KiB pages
(docs/BENCHMARKS.md, "Measuring memory-bound code here": about 3 GB/s against
about 14 GB/s for a copy into memory already touched), and a ``bytearray``
turned into ``bytes`` at the end is written twice. On CPython we allocate the
``bytes`` object uninitialised (the documented
``PyBytes_FromStringAndSize(NULL, n)`` idiom), ask the kernel for huge pages
over it (``madvise``; a no-op where THP is off) and fill it in place before
anyone else can see it: the writer must write every byte. Elsewhere, and for
small messages, we fill a ``bytearray`` and copy it once into ``bytes``.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

__all__ = ["allocate", "finish"]

_HUGE = 1 << 21
_MIN_FAST = 64 << 10  # below this, a bytearray and one copy cost about as much
_MADV_HUGEPAGE = 14


def _load() -> tuple | None:
    """Bind the C API pieces once; None where they are not available."""
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return None
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
        addr = ctypes.pythonapi.PyBytes_AsString
        addr.restype, addr.argtypes = ctypes.c_void_p, [ctypes.py_object]
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.restype = ctypes.c_int
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (AttributeError, OSError):
        return None
    return new, addr, madvise


_API = _load()


def allocate(total: int) -> tuple[bytes | bytearray, np.ndarray]:
    """A new ``total``-byte buffer and a writable uint8 view of it; finish() it after filling.

    On CPython/Linux the buffer is already the final ``bytes`` (huge-page backed);
    elsewhere it is a bytearray that ``finish`` copies once.
    """
    if _API is None or total < _MIN_FAST:
        buf = bytearray(total)
        return buf, np.frombuffer(buf, np.uint8)
    new, addr_of, madvise = _API
    out = new(None, total)
    addr = addr_of(out)
    start, end = -(-addr // _HUGE) * _HUGE, (addr + total) // _HUGE * _HUGE
    if end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)
    view = memoryview((ctypes.c_char * total).from_address(addr)).cast("B")
    return out, np.frombuffer(view, np.uint8)


def finish(buf: bytes | bytearray) -> bytes:
    """The filled buffer as bytes (drop every view of it first)."""
    return buf if isinstance(buf, bytes) else bytes(buf)
