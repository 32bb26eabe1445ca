"""Error feedback: what a lossy codec did not send this round is added to the next delta.

With feedback, compressed deltas converge like uncompressed ones (Karimireddy
et al. 2019; Stich et al. 2018): over rounds, the sum of what the coordinator
decodes tracks the sum of the true deltas, off by at most one residual.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from serialization import Codec, Encoded, TensorDict, dumps_stream, parse_codec

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-tensor float32 residuals for one run in one volunteer process; buffers are reused."""

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
        residual: dict[str, torch.Tensor] = {}
        for name, tensor in delta.items():
            if (
                not isinstance(tensor, torch.Tensor)
                or not chosen.for_tensor(tensor.numel(), tensor.is_floating_point()).lossy
            ):
                corrected[name] = (
                    tensor  # sent exactly (`none`, or a size policy's lossless pick): no residual
                )
                continue
            buf = self._buffer(name, tensor)
            buf.add_(tensor.detach().to("cpu", torch.float32).reshape(buf.shape))
            corrected[name] = residual[name] = buf
        self._residual = residual

        def keep_unsent(name: str, used: Codec, fields: dict[str, np.ndarray]) -> None:
            if name in residual:
                used.subtract_decoded_(residual[name].view(-1).numpy(), fields)

        return dumps_stream(corrected, meta, chosen, keep_unsent)

    def reset(self) -> None:
        """Forget every residual (a new run, or a model the residuals no longer fit)."""
        self._residual.clear()

    def residual_norm(self) -> float:
        """L2 norm of everything not yet sent (for logs and tests)."""
        return float(sum(float(r.double().pow(2).sum()) for r in self._residual.values())) ** 0.5

    def _buffer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The residual of ``name``: kept if its shape still fits, else a fresh zero one."""
        buf = self._residual.get(name)
        if buf is None or buf.shape != tensor.shape:
            buf = torch.zeros(tensor.shape, dtype=torch.float32)
        return buf
