"""Capability routing: which queue a run's shards go to, and which queues a volunteer takes.

A run that needs a GPU or a minimum of device memory posts its shards to a
queue named after that need (``train.gpu``, ``train.16g``, ``train.gpu.16g``);
a run without needs posts to ``train``. A volunteer consumes ``train`` and
every routed queue its device meets, so a shard never reaches a machine that
cannot train it and no message has to be handed back. Memory needs are
rounded up to a tier, so a volunteer listens to a bounded number of queues.

A volunteer's capabilities are its own claim: routing spares honest machines
work they cannot do, it is not a trust boundary (a lying volunteer only
trains slowly, and its deltas are judged like anyone's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from broker.keys import TRAIN_QUEUE

# GB of device memory a run may require, rounded up to the next of these.
MEMORY_TIERS_GB = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# The most device memory a volunteer may offer (volunteer start --memory-gb) or report.
MAX_MEMORY_GB = 4096
# Device classes a run may require; "gpu" is any accelerator (CUDA or Apple MPS).
DEVICE_CLASSES = ("gpu",)
# How the trusted side's lease refusals for a failed capability claim begin
# (``coordinator.runs.capabilities``): a volunteer refused so stops taking what it cannot serve.
CAPABILITY_REFUSAL = "capability:"
MEMORY_REFUSAL = "capability: memory claim failed"
SPEED_REFUSAL = "capability: speed claim failed"


@dataclass(frozen=True)
class Need:
    """What a run asks of the volunteers that train it."""

    device: str | None = None  # a DEVICE_CLASSES entry, or None for any device
    memory_gb: int = 0  # a MEMORY_TIERS_GB entry, or 0 for any amount

    @property
    def queue(self) -> str:
        """The train queue of a run with this need: ``train`` when it needs nothing."""
        parts = [TRAIN_QUEUE]
        if self.device:
            parts.append(self.device)
        if self.memory_gb:
            parts.append(f"{self.memory_gb}g")
        return ".".join(parts)

    def describe(self) -> str:
        """Human words for the need, e.g. ``a gpu with at least 16 GB``."""
        device = f"a {self.device}" if self.device else "a device"
        return device + (f" with at least {self.memory_gb} GB" if self.memory_gb else "")

    def as_config(self) -> dict[str, object]:
        return {"require": self.device, "min_memory_gb": self.memory_gb or None}


def need_of(require: str | None, min_memory_gb: float | None) -> Need:
    """The need of ``init --require`` and ``--min-memory-gb``; ValueError with the reason if invalid."""
    if require is not None and require not in DEVICE_CLASSES:
        raise ValueError(f"--require {require!r}: use one of {', '.join(DEVICE_CLASSES)}")
    tier = 0
    if min_memory_gb is not None:
        if not (math.isfinite(min_memory_gb) and min_memory_gb > 0):
            raise ValueError(f"--min-memory-gb {min_memory_gb}: must be a number of GB above 0")
        fitting = [t for t in MEMORY_TIERS_GB if t >= min_memory_gb]
        if not fitting:
            raise ValueError(f"--min-memory-gb {min_memory_gb:g}: at most {MEMORY_TIERS_GB[-1]} GB")
        tier = fitting[0]
    return Need(require, tier)


def queues_for(device_class: str, memory_gb: float) -> list[str]:
    """Every queue a volunteer with this device class and device memory may take shards from."""
    tiers = [t for t in MEMORY_TIERS_GB if t <= memory_gb]
    classes = [None, *(c for c in DEVICE_CLASSES if c == device_class)]
    return [Need(c, t).queue for c in classes for t in (0, *tiers)]


def train_queues() -> frozenset[str]:
    """Every queue a run may post its shards to: ``train`` and each routed queue.

    The trusted side keeps kombu's keys to these: a ``train.*`` list of any
    other name is a volunteer's junk (``coordinator.rounds.janitor``), and a message is
    restored to no other queue (``tasks.poison``).
    """
    return frozenset(_NEEDS)


def queue_need(queue: str) -> Need | None:
    """The need a train queue's name stands for (``train.gpu.16g``: a gpu, 16 GB), None for another name."""
    return _NEEDS.get(queue)


def unservable(queues: Sequence[str], refused: str, reason: str) -> list[str]:
    """Which of ``queues`` a volunteer refused a lease on queue ``refused`` for ``reason`` cannot serve.

    A failed memory claim rules out every queue that needs as much memory or
    more, a failed speed claim every GPU queue; another capability refusal
    the refused queue alone. ``train`` needs nothing and is never ruled out.
    """
    need = queue_need(refused)
    if need is None or not reason.startswith(CAPABILITY_REFUSAL) or need == Need():
        return []
    out = []
    for queue in queues:
        their = queue_need(queue)
        if their is None or their == Need():
            continue
        if reason.startswith(MEMORY_REFUSAL):
            ruled_out = bool(need.memory_gb) and their.memory_gb >= need.memory_gb
        elif reason.startswith(SPEED_REFUSAL):
            ruled_out = their.device == "gpu"
        else:
            ruled_out = queue == refused
        if ruled_out:
            out.append(queue)
    return out


_ALL_NEEDS = (Need(c, t) for c in (None, *DEVICE_CLASSES) for t in (0, *MEMORY_TIERS_GB))
_NEEDS = {need.queue: need for need in _ALL_NEEDS}
