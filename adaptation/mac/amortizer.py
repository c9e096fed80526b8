"""The amortization network: one document in, one T x d modulation out, in a single forward pass.

What reads the text is the config's `reads`: `own`, a small transformer encoder of its own, or
`base`, the frozen base itself, whose hidden states at `base_layer` are projected to the encoder's
width (the base already reads; only a small head learns). Then T learned query vectors
cross-attend to them (padding masked) and a position-wise MLP lifts each of the T outputs to the
base model's width d. The question encoder of the aggregator is the same network with its own
weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adaptation.mac.blocks import AttentionBlock


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a text -> T x d network. `vocab_size` follows the tokenizer it reads with.
    `reads="base"`: the text is read by the frozen base (its own tokenizer; `out_width` is its
    hidden size), at hidden state `base_layer` (0 = embeddings, -1 = the last layer); `layers`
    own blocks may still follow, 0 for none."""

    vocab_size: int
    out_width: int
    width: int = 256
    layers: int = 2
    query_layers: int = 2
    heads: int = 4
    num_tokens: int = 16
    max_length: int = 256
    dropout: float = 0.0
    reads: Literal["own", "base"] = "own"
    base_layer: int = -1

    def __post_init__(self) -> None:
        if self.reads not in ("own", "base"):
            raise ValueError(f"an encoder reads with 'own' or 'base', not {self.reads!r}")

    @property
    def reads_base(self) -> bool:
        return self.reads == "base"


class Amortizer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        if c.reads_base:
            self.read = nn.Sequential(nn.LayerNorm(c.out_width), nn.Linear(c.out_width, c.width))
        else:
            self.embed = nn.Embedding(c.vocab_size, c.width)
            self.position = nn.Embedding(c.max_length, c.width)
            for table in (self.embed, self.position):
                nn.init.normal_(table.weight, std=0.02)
        self.encoder = nn.ModuleList(
            AttentionBlock(c.width, c.heads, cross=False, dropout=c.dropout)
            for _ in range(c.layers)
        )
        self.encoder_norm = nn.LayerNorm(c.width)
        self.queries = nn.Parameter(torch.randn(c.num_tokens, c.width) * 0.02)
        self.query_self = nn.ModuleList(
            AttentionBlock(c.width, c.heads, cross=False, dropout=c.dropout)
            for _ in range(c.query_layers)
        )
        self.query_cross = nn.ModuleList(
            AttentionBlock(c.width, c.heads, cross=True, dropout=c.dropout)
            for _ in range(c.query_layers)
        )
        self.head = nn.Sequential(
            nn.LayerNorm(c.width),
            nn.Linear(c.width, 2 * c.out_width),
            nn.GELU(),
            nn.Linear(2 * c.out_width, c.out_width),
        )

    @torch.no_grad()
    def init_embeddings(self, table: torch.Tensor) -> None:
        """Start from a base model's token embeddings [V, d] (same tokenizer), so the encoder
        begins with meaningful tokens instead of noise: copied when d equals the encoder width,
        else projected onto their top principal directions. An encoder reading with the base has
        no table of its own: nothing to do."""
        if self.config.reads_base:
            return
        vocab, width = self.embed.weight.shape
        if table.shape[0] != vocab:
            raise ValueError(
                f"embedding table of {table.shape[0]} tokens for a {vocab}-token encoder"
            )
        table = table.detach().float().to(self.embed.weight.device)
        if table.shape[1] != width:
            centred = table - table.mean(dim=0)
            _, _, directions = torch.pca_lowrank(
                centred, q=min(width, *centred.shape), center=False
            )
            table = torch.zeros(vocab, width, device=table.device)
            table[:, : directions.shape[1]] = centred @ directions
        self.embed.weight.copy_(table * (0.02 / table.std().clamp(min=1e-8)))

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids/mask [B, S] (mask True on real tokens) -> modulations [B, T, out_width].
        An encoder that reads with the base takes the base's `hidden` states [B, S, d] too."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the encoder's {self.config.max_length}; "
                "truncate with tokenize()"
            )
        if self.config.reads_base:
            if hidden is None:
                raise ValueError("this encoder reads the base's hidden states; pass `hidden`")
            h = self.read(hidden.to(self.read[1].weight.dtype))
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            h = self.embed(input_ids) + self.position(positions)
        for block in self.encoder:
            h = block(h, mask)
        h = self.encoder_norm(h)
        q = self.queries.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        all_queries = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        for self_block, cross_block in zip(self.query_self, self.query_cross):
            q = self_block(q, all_queries)
            q = cross_block(q, mask, memory=h)
        return self.head(q)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (ids [B, S], mask [B, S] with True on real tokens)."""
    length = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def token_lists(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Encoder input ids, cut to the encoder's length; an empty text still gets one token."""
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        out.append(ids[:max_length] or [_pad_id(tokenizer)])
    return out


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(token_lists(tokenizer, texts, max_length), _pad_id(tokenizer), device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)
