"""Capability challenges: what both sides compute from a challenge's seed, and the entries they swap.

A challenge is the product ``C = A @ B`` of two ``n`` x ``n`` matrices of
+1/-1 entries drawn from a seed the trusted side picks. Every entry of ``C``
is an integer in [-n, n], exact in float32, TF32 or bfloat16 arithmetic on
any device, so the trusted side checks answers exactly. The rows of ``A``
and ``B`` are drawn in blocks of ``BLOCK`` rows, each from its own stream
(``SeedSequence(seed, spawn_key=(matrix, block))``): the trusted side draws
the few rows of ``A`` it checks without drawing the rest.

The exchange (``coordinator.runs.capabilities`` answers, ``volunteer.challenge``
asks), over the lease request list and answers the volunteer already uses:

1. ask: ``challenge|ask|REPLY|MEMORY_GB|GFLOPS|DEVICE`` -> on ``ct:grant:NAME:REPLY``
   ``{"challenge": ID, "n": n, "seed": seed, "rows": k, "deadline": s}``
   (or ``{"refused": reason}``);
2. commit: the SHA-256 of each row of ``C`` (``n`` x 32 bytes) at
   ``ct:grant:NAME:ID:commit``, then ``challenge|commit|ID`` -> on
   ``ct:grant:NAME:ID`` ``{"open": [row, ...]}``: ``k`` rows the trusted side
   draws only now;
3. open: those rows of ``C`` (int32, little-endian) at ``ct:grant:NAME:ID:open``,
   then ``challenge|open|ID``.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

BLOCK = 64  # rows drawn from one stream; n is a multiple of it
MATRIX_A, MATRIX_B = 0, 1
DIGEST = 32  # bytes of one row's SHA-256
KIND = "challenge"
_NONCE = re.compile(r"[0-9a-f]{8,64}")
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")
_DEVICE = re.compile(r"cpu|gpu")


def rows(seed: int, matrix: int, n: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of matrix ``matrix`` (A or B) of challenge ``seed``: float32 of +1/-1."""
    first, last = start // BLOCK, (stop - 1) // BLOCK
    blocks = [_block(seed, matrix, n, b) for b in range(first, last + 1)]
    whole = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return whole[start - first * BLOCK : stop - first * BLOCK]


def row_digests(product: np.ndarray) -> bytes:
    """The commitment to a product: each row's SHA-256 (of its int32 little-endian bytes), in order."""
    data = np.ascontiguousarray(product, dtype="<i4")
    return b"".join(hashlib.sha256(row.tobytes()).digest() for row in data)


def ask_entry(reply: str, memory_gb: float, gflops: float, device: str) -> str:
    return f"{KIND}|ask|{reply}|{memory_gb:.6g}|{gflops:.6f}|{device}"


def step_entry(step: str, challenge: str) -> str:
    """``commit`` or ``open``: the answer to challenge ``challenge`` is in place."""
    return f"{KIND}|{step}|{challenge}"


def parse(entry: str) -> tuple[str, str, float, float, str] | None:
    """(step, nonce, memory GB, GFLOP/s, device) of a challenge entry; None if malformed.

    A ``commit`` or ``open`` entry has zeros and "" for the claims, which only ``ask`` carries.
    """
    parts = entry.split("|")
    if len(parts) == 6 and parts[:2] == [KIND, "ask"]:
        _, _, reply, memory, gflops, device = parts
        if not (_NONCE.fullmatch(reply) and _NUMBER.fullmatch(memory) and _NUMBER.fullmatch(gflops)):
            return None
        if not _DEVICE.fullmatch(device):
            return None
        return "ask", reply, float(memory), float(gflops), device
    if len(parts) == 3 and parts[0] == KIND and parts[1] in ("commit", "open") and _NONCE.fullmatch(parts[2]):
        return parts[1], parts[2], 0.0, 0.0, ""
    return None


def is_challenge(entry: bytes) -> bool:
    """Whether a volunteer's request entry belongs to a challenge (not to a lease)."""
    return entry.startswith(KIND.encode() + b"|")


def _block(seed: int, matrix: int, n: int, block: int) -> np.ndarray:
    stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(matrix, block))))
    bits = np.unpackbits(np.frombuffer(stream.bytes(BLOCK * n // 8), dtype=np.uint8))
    return (bits.astype(np.float32) * 2 - 1).reshape(BLOCK, n)
