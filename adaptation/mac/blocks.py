"""Pre-LayerNorm attention blocks with key padding masks, shared by the amortizer and aggregator.

Masks are boolean with True marking a real key. A row whose keys are all padding would make
softmax undefined (NaN that then leaks through later layers), so such rows attend to their first
key instead; their output is meaningless and callers mark it absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def heads_for(width: int, wanted: int = 8) -> int:
    """The largest head count up to `wanted` that divides `width`."""
    return next(h for h in range(min(wanted, width), 0, -1) if width % h == 0)


def safe_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """Give every all-padding row one visible key, so its softmax stays finite."""
    empty = ~mask.any(dim=-1)
    if not bool(empty.any()):
        return mask
    mask = mask.clone()
    mask[empty, 0] = True
    return mask


class MaskedAttention(nn.Module):
    """Multi-head attention of x [B, Lq, w] over memory [B, Lk, w]; padded keys get no weight."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = safe_key_mask(mask)[:, None, None, :]
        q, k, v = self._split(self.q(x)), self._split(self.k(memory)), self._split(self.v(memory))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class AttentionBlock(nn.Module):
    """x + Attn(LN(x), LN(keys)), then x + FFN(LN(x)); keys are a memory (cross) or x itself."""

    def __init__(
        self, width: int, heads: int, cross: bool, ff_mult: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width) if cross else None
        self.attn = MaskedAttention(width, heads)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` [B, Lk] covers the keys: `memory` in a cross block, `x` itself otherwise."""
        q = self.norm_q(x)
        keys = q if self.norm_kv is None else self.norm_kv(memory)
        x = x + self.drop(self.attn(q, keys, mask))
        return x + self.drop(self.ff(self.norm_ff(x)))
