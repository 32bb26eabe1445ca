"""Applying a model update: how a published version follows from the one before it.

A compressed downlink publishes each version as an encoded update from the
previous one (``coordinator.merging.downlink``). Both the aggregator and every
volunteer compute the new weights with this one function, in the same
float32 arithmetic, so they hold the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .types import TensorDict


def apply_update(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> TensorDict:
    """``base`` moved by a decoded ``update``: floating tensors add (in float32, then back to
    their own dtype), other tensors (integer buffers) are replaced by the update's value."""
    moved: TensorDict = {}
    for name, old in base.items():
        change = update[name]
        if old.is_floating_point():
            moved[name] = (old.float() + change.float()).to(old.dtype)
        else:
            moved[name] = change.clone()
    return moved
