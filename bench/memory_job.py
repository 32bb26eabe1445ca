"""A job of exactly ``params`` float32 parameters whose training step costs next to nothing.

For ``bench/memory.py``: what a round holds in memory should be the model, its gradients,
optimizer state and the blobs, not activations. The model is ``tensors`` flat parameters
(``w0``, ``w1``, ...) that together hold ``params`` values; a batch is a few random
positions in each, and the loss pulls them towards fixed targets. The gradient is still
dense (model-sized, as in any model) and AdamW's weight decay moves every value, so the
delta is dense too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

BATCH = 32
MAX_PARAMS = 1 << 36


class FlatModel(nn.Module):
    """``params`` values split over ``tensors`` 1-D parameters."""

    def __init__(self, params: int, tensors: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        base, extra = divmod(params, tensors)
        for i in range(tensors):
            size = base + (1 if i < extra else 0)
            weight = torch.empty(size).uniform_(-0.01, 0.01, generator=gen)
            self.register_parameter(f"w{i}", nn.Parameter(weight))

    def pick(self, index: torch.Tensor) -> torch.Tensor:
        """The values at ``index`` (fractions in [0, 1)) of every parameter, concatenated."""
        return torch.cat([p[(index * p.numel()).long()] for p in self.parameters()])


class MemoryJob:
    """The job interface over ``FlatModel``: shards of random positions, squared-error loss."""

    name = "memory"
    batch_size = BATCH

    def __init__(self, params: int, tensors: int = 4, seed: int = 0) -> None:
        if not 1 <= tensors <= params <= MAX_PARAMS:
            raise ValueError(f"need 1 <= tensors <= params <= {MAX_PARAMS}, got {tensors=}, {params=}")
        self.params = int(params)
        self.tensors = int(tensors)
        self.seed = seed
        self.probe = torch.rand(BATCH, generator=torch.Generator().manual_seed(1))

    def build_model(self) -> nn.Module:
        """Same seed, same weights."""
        return FlatModel(self.params, self.tensors, self.seed)

    def shard(self, index: int, count: int) -> Iterator[Any]:
        """Endless batches of random positions (from torch's global RNG, as the trainer seeds it)."""
        while True:
            yield {"index": torch.rand(BATCH), "target": torch.ones(BATCH)}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Squared error of the picked values against the targets."""
        picked = model.pick(batch["index"])  # type: ignore[operator]
        return (picked - batch["target"].repeat(self.tensors)).square().mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The loss at a fixed set of positions."""
        with torch.no_grad():
            return {"eval_loss": float(self.loss(model, {"index": self.probe, "target": torch.ones(BATCH)}))}


def make_job(params: int | float = 1_000_000, tensors: int = 4, seed: int = 0) -> MemoryJob:
    """Factory: ``params`` (a count; 1e8 works), ``tensors``, ``seed``."""
    return MemoryJob(int(params), tensors, seed)
