"""The amortization network: one document in, one T x d modulation out, in a single forward pass.

A small transformer encoder reads the text; T learned query vectors cross-attend to it (padding
masked) and a position-wise MLP lifts each of the T outputs to the base model's width d. The
question encoder of the aggregator is the same network with its own weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adaptation.mac.blocks import AttentionBlock


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a text -> T x d network. `vocab_size` follows the tokenizer it reads with."""

    vocab_size: int
    out_width: int
    width: int = 256
    layers: int = 2
    query_layers: int = 2
    heads: int = 4
    num_tokens: int = 16
    max_length: int = 256
    dropout: float = 0.0


class Amortizer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
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
        else projected onto their top principal directions."""
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

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids/mask [B, S] (mask True on real tokens) -> modulations [B, T, out_width]."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the encoder's {self.config.max_length}; "
                "truncate with tokenize()"
            )
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
