"""Error feedback: what a lossy codec did not send this round is added to the next delta.

With feedback, compressed deltas converge like uncompressed ones (Karimireddy
et al. 2019; Stich et al. 2018): over rounds, the sum of what the coordinator
decodes tracks the sum of the true deltas, off by at most one residual.

Memory: the residual lives between shards, through the whole of the next
shard's training, beside the weights, gradients, optimizer state and base copy
(a volunteer's peak). It is kept in bfloat16, half a float32 model: rounding
it loses about 2**-9 of the residual each round, a small fraction of what
the codec itself leaves out, and the sums still track each other (the tests
bound the drift over fifty rounds). A delta the trainer hands over as
``Consumable`` (its own scratch: the trained weights' storage) has the residual
added and the decoding subtracted in place; any other delta is left alone and
a float32 copy of each tensor is made instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from serialization import Codec, Encoded, TensorDict, dumps_stream, parse_codec

__all__ = ["RESIDUAL_DTYPE", "Consumable", "ErrorFeedback"]

RESIDUAL_DTYPE = torch.bfloat16


class Consumable(dict[str, torch.Tensor]):
    """A delta its owner no longer needs: ``ErrorFeedback`` may overwrite its float32 CPU tensors."""


class ErrorFeedback:
    """Per-tensor bfloat16 residuals for one run in one volunteer process."""

    def __init__(self) -> None:
        self._residual: dict[str, torch.Tensor] = {}

    def encode(self, delta: Mapping[str, torch.Tensor], meta: Mapping, codec: Codec | str) -> bytes:
        """Wire bytes of delta + residual; keeps (that sum - what the receiver decodes)."""
        return self.encode_stream(delta, meta, codec).gather()

    def encode_stream(self, delta: Mapping[str, torch.Tensor], meta: Mapping, codec: Codec | str) -> Encoded:
        """``encode`` as a stream (``dumps_stream``): each tensor's residual is kept as it is read.

        Read it whole before the next ``encode``; the delta must not change until then.
        """
        chosen = parse_codec(codec) if isinstance(codec, str) else codec
        if not chosen.lossy:
            self._residual.clear()  # lossless: nothing is ever left behind
            return dumps_stream(delta, meta, chosen)
        corrected: TensorDict = {}
        owned = isinstance(delta, Consumable)
        for name, tensor in delta.items():
            if (
                not isinstance(tensor, torch.Tensor)
                or not chosen.for_tensor(tensor.numel(), tensor.is_floating_point()).lossy
            ):
                corrected[name] = (
                    tensor  # sent exactly (`none`, or a size policy's lossless pick): no residual
                )
                continue
            flat = tensor.detach()
            if not (owned and _cpu_float32(flat) and flat.is_contiguous()):
                flat = flat.to("cpu", torch.float32, copy=True)
            kept = self._residual.get(name)
            if kept is not None and kept.shape == flat.shape:
                flat.add_(kept)
            corrected[name] = flat
        previous, self._residual = self._residual, {}
        previous.clear()  # the old residuals go now: the new ones are made tensor by tensor

        def keep_unsent(name: str, used: Codec, fields: dict[str, np.ndarray]) -> None:
            sent = corrected[name]
            if not sent.is_floating_point() or not used.lossy:
                return  # sent exactly; a lossless pick's fields are ``sent`` itself, not yet read
            used.subtract_decoded_(sent.view(-1).numpy(), fields)
            self._residual[name] = sent.to(RESIDUAL_DTYPE)

        return dumps_stream(corrected, meta, chosen, keep_unsent)

    def reset(self) -> None:
        """Forget every residual (a new run, or a model the residuals no longer fit)."""
        self._residual.clear()

    def residual_norm(self) -> float:
        """L2 norm of everything not yet sent (for logs and tests)."""
        return float(sum(float(r.double().pow(2).sum()) for r in self._residual.values())) ** 0.5


def _cpu_float32(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu"
