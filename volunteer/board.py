"""The notice board a volunteer's processes share: paused or not (and why), the queues its
trainers found they cannot serve, and each trainer's progress.

``volunteer start`` makes one before Celery forks its pool, in memory shared
with every process forked after (an anonymous shared mapping), so the worker's
main process (which watches the machine and answers the control socket) and
the pool processes (which train) see the same board without a round trip:
a trainer reads one byte between two steps. Each trainer (one per pool
process or thread) writes its progress into a slot of its own as a small JSON
document. A trainer refused a lease for a failed capability claim writes the
refused run's queue there (``withdraw``), and the main process stops
consuming what it cannot serve until then (``tasks.training.QueueGate``).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing
import os
import struct
import time
from typing import Any

import psutil

HEADER = 1024  # byte 0: paused; then the JSON of the reasons
WITHDRAWN = 4096  # the length, then the JSON of [queue, reason, until] entries, one per queue
SLOTS = HEADER + WITHDRAWN  # where the trainers' slots begin
SLOT = 1024  # per trainer: owner pid (8), owner id (8), JSON length (4), JSON
_OWNER = struct.Struct("<qqI")
MAX_REASON = 200  # characters of a withdrawal's reason kept
LOCK_TIMEOUT = 1.0  # a process killed holding the lock must not stall the others


class Board:
    """Shared pause flag and progress slots; make it before the pool forks."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._memory = mmap.mmap(-1, SLOTS + slots * SLOT)  # MAP_SHARED | MAP_ANONYMOUS
        self._lock = multiprocessing.get_context("fork").Lock()
        self._claimed = 0

    # --- the main process's side ---------------------------------------------
    def set_pause(self, reasons: list[str]) -> None:
        """Publish the reasons to pause (empty: train)."""
        body = json.dumps(reasons).encode()[: HEADER - 5]
        with self._locked():
            self._memory[1:5] = struct.pack("<I", len(body))
            self._memory[5 : 5 + len(body)] = body
            self._memory[0] = 1 if reasons else 0

    def progress(self) -> list[dict[str, Any]]:
        """Every live trainer's latest progress document."""
        out = []
        with self._locked():
            for index in range(self.slots):
                pid, _, length = _OWNER.unpack_from(self._memory, SLOTS + index * SLOT)
                if pid and length and psutil.pid_exists(pid):
                    start = SLOTS + index * SLOT + _OWNER.size
                    try:
                        out.append(json.loads(bytes(self._memory[start : start + length])))
                    except ValueError:
                        continue
        return out

    def withdrawn(self, now: float) -> list[tuple[str, str, float]]:
        """The queues withdrawn until after ``now`` (``time.monotonic``): (queue, reason, until)."""
        return [entry for entry in self._withdrawals() if entry[2] > now]

    # --- the trainers' side --------------------------------------------------
    def withdraw(self, queue: str, reason: str, until: float) -> None:
        """Say that this volunteer cannot serve ``queue`` (``reason``: the refusal) until ``until``."""
        now = time.monotonic()
        with self._locked():
            kept = [e for e in self._withdrawals(locked=True) if e[0] != queue and e[2] > now]
            entries = [*kept, (queue, reason[:MAX_REASON], until)]
            body = json.dumps(entries).encode()
            while len(body) > WITHDRAWN - 4:  # the oldest go first
                entries = entries[1:]
                body = json.dumps(entries).encode()
            struct.pack_into("<I", self._memory, HEADER, len(body))
            self._memory[HEADER + 4 : HEADER + 4 + len(body)] = body

    @property
    def paused(self) -> bool:
        """One byte, read between two training steps."""
        return self._memory[0] == 1

    def reasons(self) -> list[str]:
        with self._locked():
            (length,) = struct.unpack_from("<I", self._memory, 1)
            body = bytes(self._memory[5 : 5 + length])
        try:
            found = json.loads(body) if body else []
        except ValueError:
            return []
        return [str(r) for r in found] if isinstance(found, list) else []

    def claim(self) -> int:
        """A slot for one trainer: a free one, or one whose process is gone (its count carries on)."""
        self._claimed += 1
        owner = (os.getpid(), id(self) ^ self._claimed)
        with self._locked():
            for index in range(self.slots):
                pid, _, length = _OWNER.unpack_from(self._memory, SLOTS + index * SLOT)
                if pid == 0 or not psutil.pid_exists(pid):
                    _OWNER.pack_into(self._memory, SLOTS + index * SLOT, *owner, length)
                    return index
        return -1  # more trainers than slots: this one's progress is not shown

    def write(self, slot: int, document: dict[str, Any]) -> None:
        """Replace a trainer's progress document."""
        if slot < 0:
            return
        body = json.dumps(document, separators=(",", ":")).encode()[: SLOT - _OWNER.size]
        start = SLOTS + slot * SLOT
        with self._locked():
            pid, owner, _ = _OWNER.unpack_from(self._memory, start)
            _OWNER.pack_into(self._memory, start, pid, owner, len(body))
            self._memory[start + _OWNER.size : start + _OWNER.size + len(body)] = body

    def read(self, slot: int) -> dict[str, Any]:
        """A trainer's own last document (what a slot taken over from a dead process held)."""
        if slot < 0:
            return {}
        start = SLOTS + slot * SLOT
        with self._locked():
            _, _, length = _OWNER.unpack_from(self._memory, start)
            body = bytes(self._memory[start + _OWNER.size : start + _OWNER.size + length])
        try:
            found = json.loads(body) if body else {}
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def _withdrawals(self, locked: bool = False) -> list[tuple[str, str, float]]:
        with contextlib.nullcontext() if locked else self._locked():
            (length,) = struct.unpack_from("<I", self._memory, HEADER)
            body = bytes(self._memory[HEADER + 4 : HEADER + 4 + min(length, WITHDRAWN - 4)])
        try:
            found = json.loads(body) if body else []
            return [(str(q), str(r), float(u)) for q, r, u in found]
        except (ValueError, TypeError):
            return []

    def _locked(self) -> _Held:
        return _Held(self._lock)


class _Held:
    """The board's lock, given up after LOCK_TIMEOUT rather than waited for without end."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.got = False

    def __enter__(self) -> None:
        self.got = self.lock.acquire(timeout=LOCK_TIMEOUT)

    def __exit__(self, *exc: object) -> None:
        if self.got:
            self.lock.release()
