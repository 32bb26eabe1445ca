"""Type aliases shared by every package: the one place they are defined."""

from __future__ import annotations

import torch

__all__ = ["TensorDict"]

# A model's weights, a delta or optimizer state: tensor name -> tensor.
TensorDict = dict[str, torch.Tensor]
