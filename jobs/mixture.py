"""An ensemble of models as one model: the weighted mixture of their output distributions.

``coordinator fuse --method ensemble`` serves several runs of one job as one model. Each
member's output (logits over the last dimension) becomes a distribution; the mixture's
probability of each outcome is the weighted sum of the members'. ``Mixture.forward`` returns
the log of that mixture, which a job's ``evaluate`` and ``generate`` treat as logits: the
softmax of log-probabilities that already sum to one is themselves. So the job's own
evaluation (cross entropy, accuracy) and sampling work on an ensemble unchanged.

A mixture's log-loss never exceeds the weighted mean of its members' (the log is concave),
and costs one forward pass per member.

Weights are fixed (``prior``), or, for next-token models, each member's posterior given the
context so far (Branch-Train-Merge, Li et al. 2022): at position ``t`` member ``i`` weighs
``prior_i * p_i(x_1..x_t)``, normalised, where ``p_i(x_1..x_t)`` is the probability the
member gave the window's tokens before ``t``. Only the inputs are used, never the targets, so
the mixture is a proper model of the next token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Mixture(nn.Module):
    """``members`` mixed with fixed weights ``prior`` (they need not sum to 1), or by posterior."""

    def __init__(self, members: Sequence[nn.Module], prior: Sequence[float], posterior: bool = False) -> None:
        super().__init__()
        if len(members) < 2 or len(members) != len(prior):
            raise ValueError(f"a mixture needs two or more members and one weight each, got {len(prior)}")
        weights = torch.tensor([float(w) for w in prior], dtype=torch.float64)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"mixture weights must be finite, non-negative and not all zero: {list(prior)}")
        self.members = nn.ModuleList(members)
        self.posterior = posterior
        # log of the normalised prior; a zero weight is -inf (that member never counts)
        self.register_buffer("log_prior", (weights / weights.sum()).log().float(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Log mixture probabilities, shaped like one member's output (``[..., outcomes]``)."""
        log_probs = torch.stack([F.log_softmax(m(idx).float(), dim=-1) for m in self.members])
        log_prior = self.get_buffer("log_prior")
        shape = (len(self.members),) + (1,) * (log_probs.dim() - 1)
        if self.posterior:
            log_weights = _log_posterior(log_probs, idx, log_prior).unsqueeze(-1)
        else:
            log_weights = log_prior.view(shape)
        return torch.logsumexp(log_weights + log_probs, dim=0)


def _log_posterior(log_probs: torch.Tensor, idx: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Each member's log posterior at each position ``[members, batch, time]`` of next-token models.

    ``log_probs`` is ``[members, batch, time, vocab]`` where position ``s`` predicts ``idx[:, s+1]``;
    the context before position ``t`` is ``idx[:, 1..t]`` (the first token has no prediction).
    """
    if idx.dim() != 2 or log_probs.dim() != 4 or log_probs.shape[1:3] != idx.shape:
        raise ValueError(
            "posterior weights need a next-token model: token ids [batch, time] in, "
            f"logits [batch, time, vocab] out; got {tuple(idx.shape)} -> {tuple(log_probs.shape[1:])}"
        )
    members = log_probs.shape[0]
    following = idx[:, 1:].unsqueeze(0).expand(members, -1, -1).unsqueeze(-1).long()
    token_ll = log_probs[:, :, :-1].gather(-1, following).squeeze(-1)  # [members, batch, time-1]
    seen = F.pad(token_ll.cumsum(dim=-1), (1, 0))  # log p_i(context before t); 0 at t = 0
    joint = log_prior.view(members, 1, 1) + seen
    return joint - torch.logsumexp(joint, dim=0, keepdim=True)
