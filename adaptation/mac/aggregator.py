"""The aggregation network: a question picks what it needs out of the whole memory.

The question becomes T query vectors (its own encoder); these cross-attend, through pre-LN
blocks, to every memory entry flattened into N*T keys. A memory larger than the window is folded
hierarchically: chunks of entries are each aggregated into one pseudo-entry, and that repeats
until what remains fits the window. Every level is conditioned on the same question.

The number of levels is set by the largest memory in the batch (after dropping padding slots no
question uses); a question with fewer entries goes through the same levels.

Cost: every question still reads every entry once (O(N) per question); the folding bounds the
attention width (and activation memory), not the work. Chunks of 32 halve the number of
pseudo-entries computed at the first level against chunks of 16. For latency that does not grow
with the bank, restrict each question to retrieved entries (mac+rag).

Memories come in two layouts: shared by all questions ([1, N, T, d], the whole bank) or one per
question ([B, N, T, d] with a mask, e.g. retrieved documents only). The shared layout never
copies the memory per question: the B*T query rows are attended as one sequence, which is exact
because the blocks have no attention among queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adaptation.mac.amortizer import Amortizer, EncoderConfig
from adaptation.mac.blocks import AttentionBlock, heads_for


@dataclass(frozen=True)
class AggregatorConfig:
    width: int
    blocks: int = 4
    heads: int = 8
    window: int = 32
    chunk: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 2 <= self.chunk <= self.window:
            raise ValueError(f"need 2 <= chunk ({self.chunk}) <= window ({self.window})")


class Aggregator(nn.Module):
    def __init__(self, config: AggregatorConfig, question: EncoderConfig) -> None:
        super().__init__()
        if question.out_width != config.width:
            raise ValueError("the question encoder must output the aggregator's width")
        self.config = config
        self.question = Amortizer(question)
        heads = heads_for(config.width, config.heads)
        self.blocks = nn.ModuleList(
            AttentionBlock(config.width, heads, cross=True, dropout=config.dropout)
            for _ in range(config.blocks)
        )
        self.norm = nn.LayerNorm(config.width)

    def queries(
        self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Question ids/mask [B, S] (and the base's hidden states, for a question encoder that
        reads with the base) -> query vectors [B, T, d]."""
        return self.question(input_ids, mask, hidden)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Tq, d]; memory [1 or B, N, T, d]; mask [1 or B, N] (True = real entry).

        Returns (modulation [B, Tq, d], present [B]): `present` is False for a question whose
        memory is empty; its modulation is meaningless and must not be injected.
        """
        if mask is None:
            mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        if memory.shape[0] not in (1, queries.shape[0]) or mask.shape != memory.shape[:2]:
            raise ValueError(
                f"memory {tuple(memory.shape)} / mask {tuple(mask.shape)} do not fit "
                f"{queries.shape[0]} questions"
            )
        memory, mask = _trim(memory, mask)
        while memory.shape[1] > self.config.window:
            memory, mask = _trim(*self._fold(queries, memory, mask))
        key_mask = _entry_to_key_mask(mask, memory.shape[2])
        if memory.shape[0] == 1:
            out = self._attend_shared(queries, memory.flatten(1, 2), key_mask)
        else:
            out = self._attend(queries, memory.flatten(1, 2), key_mask)
        present = mask.any(dim=1).expand(queries.shape[0])
        return out, present

    def _attend(self, x: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_mask, memory=keys)
        return self.norm(x)

    def _attend_shared(
        self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """All questions over one memory: their query rows attend as one long sequence."""
        b, t, d = queries.shape
        return self._attend(queries.reshape(1, b * t, d), keys, key_mask).view(b, t, d)

    def _fold(
        self, queries: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One level: every chunk of entries becomes one pseudo-entry, per question."""
        bm, n, t, d = memory.shape
        b, tq, _ = queries.shape
        size = self.config.chunk
        chunks = math.ceil(n / size)
        pad = chunks * size - n
        if pad:
            memory = torch.cat([memory, memory.new_zeros(bm, pad, t, d)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(bm, pad)], dim=1)
        keys = memory.reshape(bm * chunks, size * t, d)
        key_mask = _entry_to_key_mask(mask.reshape(bm * chunks, size), t)
        chunk_present = mask.reshape(bm, chunks, size).any(dim=2)
        if bm == 1:
            # Each chunk is attended by every question's query rows at once.
            live = chunk_present[0]
            rows = queries.reshape(1, b * tq, d).expand(int(live.sum()), -1, -1)
            pseudo = memory.new_zeros(chunks, b * tq, d)
            pseudo[live] = self._attend(rows, keys[live], key_mask[live])
            pseudo = pseudo.view(chunks, b, tq, d).transpose(0, 1)
            return pseudo, chunk_present.expand(b, chunks)
        live = chunk_present.reshape(-1)
        rows = queries.repeat_interleave(chunks, dim=0)
        pseudo = memory.new_zeros(b * chunks, tq, d)
        pseudo[live] = self._attend(rows[live], keys[live], key_mask[live])
        return pseudo.view(b, chunks, tq, d), chunk_present


def _trim(memory: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing entry slots that no question uses, so padding never deepens the hierarchy."""
    used = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
    return memory[:, :used], mask[:, :used]


def _entry_to_key_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, N] per entry -> [B, N*T] per key."""
    return mask.repeat_interleave(tokens, dim=1)
