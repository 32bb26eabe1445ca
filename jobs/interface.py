"""The job interface (DESIGN.md, "job interface") and the error family of jobs.

A job is what a run trains: model, data shards, loss and evaluation. Both the
trusted aggregator and untrusted volunteers use it, so it imports nothing of
either side.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

REQUIRED_METHODS = ("build_model", "shard", "loss", "evaluate")


class JobError(ValueError):
    """A job that cannot be loaded or configured; the message names the fix."""


@runtime_checkable
class Job(Protocol):
    """What ``factory(**job_args)`` returns."""

    name: str

    def build_model(self) -> torch.nn.Module:
        """Return a fresh model; the same seed gives the same initial weights."""
        ...

    def shard(self, index: int, count: int) -> Iterable[Any]:
        """Yield training batches of shard ``index`` of ``count``, drawn from torch's global RNG."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Return the scalar training loss of ``model`` on ``batch``."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Return held-out metrics: ``eval_loss`` and optionally ``eval_accuracy``."""
        ...
