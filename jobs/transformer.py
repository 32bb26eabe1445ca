"""The decoder block both built-in language models use, and rotary positions for ``gpt``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# cos and sin tables [context, head width] (``rotary_tables``)
Rotary = tuple[torch.Tensor, torch.Tensor]


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention then MLP, each residual.

    With ``rotary`` (cos, sin tables from ``rotary_tables``) queries and keys
    are rotated by position (RoPE), so the model needs no position embedding.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        """Apply attention and MLP with residual connections."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if rotary is not None:
            cos, sin = rotary[0][:t], rotary[1][:t]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


def rotary_tables(context: int, head_width: int, base: float = 10000.0) -> Rotary:
    """cos and sin ``[context, head_width]`` for rotating pairs of channels (RoFormer's RoPE)."""
    if head_width % 2:
        raise ValueError(f"rotary positions need an even head width, got {head_width}")
    inverse = base ** (-torch.arange(0, head_width, 2, dtype=torch.float32) / head_width)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)
