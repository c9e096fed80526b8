"""Prefix injection: a T x d modulation becomes key/value prefixes for every layer of a frozen base.

P-tuning v2 style: each of the T slots has its own residual MLP, then one projection produces
[layers x (k, v) x T x kv_heads x head_dim]. The prefixes enter the base through the transformers
cache API (a DynamicCache filled layer by layer), with the attention mask extended over them.
This works unchanged for Llama, Qwen2 and GPT-2, whose attention layers all read a layer's past
keys/values from the cache.

Positions: the prompt keeps positions 0.. (counting real tokens only), exactly as without a
prefix. Prefix keys carry no position (they are never rotated), so a question reads the same
with or without memory, and a question whose memory is empty gets its prefix masked out
entirely: its outputs are those of the plain base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from adaptation.prompts import answer_stop_ids, clean_answer, qa_prompt

# transformers 5 renamed the cache argument and output `past_key_values` to `cache` (the old name is
# removed in 5.40); earlier releases know only the old name.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class PrefixShape:
    """What a base's cache expects per layer; read from its config, checked again at load."""

    layers: int
    kv_heads: int
    head_dim: int
    width: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> PrefixShape:
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        return cls(
            layers=cfg.num_hidden_layers,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            width=cfg.hidden_size,
        )


@dataclass(frozen=True)
class PrefixKV:
    """keys/values [layers, B, kv_heads, P, head_dim]; mask [B, P] (1 = visible)."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def cache(self, model: PreTrainedModel) -> DynamicCache:
        """A fresh cache holding the prefix. Fresh every forward: the model appends to it."""
        cache = DynamicCache(config=model.config)
        for layer in range(self.keys.shape[0]):
            cache.update(
                self.keys[layer].to(model.dtype), self.values[layer].to(model.dtype), layer
            )
        return cache


class PrefixProjector(nn.Module):
    def __init__(self, shape: PrefixShape, num_tokens: int, hidden: int | None = None) -> None:
        super().__init__()
        self.shape = shape
        d, h = shape.width, hidden or shape.width
        self.norm = nn.LayerNorm(d)
        # Per-slot MLP weights; the second layer starts at zero so each slot starts as identity.
        self.w1 = nn.Parameter(torch.randn(num_tokens, d, h) / d**0.5)
        self.b1 = nn.Parameter(torch.zeros(num_tokens, h))
        self.w2 = nn.Parameter(torch.zeros(num_tokens, h, d))
        self.b2 = nn.Parameter(torch.zeros(num_tokens, d))
        self.out = nn.Linear(d, shape.layers * 2 * shape.kv_heads * shape.head_dim)

    def forward(self, modulation: torch.Tensor, present: torch.Tensor) -> PrefixKV:
        """modulation [B, T, d], present [B] bool -> the prefix (masked out where not present)."""
        hidden = torch.einsum("btd,tdh->bth", self.norm(modulation), self.w1) + self.b1
        x = modulation + torch.einsum("bth,thd->btd", nn.functional.gelu(hidden), self.w2) + self.b2
        b, t, _ = x.shape
        s = self.shape
        kv = self.out(x).view(b, t, s.layers, 2, s.kv_heads, s.head_dim).permute(2, 3, 0, 4, 1, 5)
        mask = present.to(torch.long)[:, None].expand(b, t)
        return PrefixKV(keys=kv[:, 0], values=kv[:, 1], mask=mask)


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefix_logits(
    model: PreTrainedModel,
    prefix_kv: PrefixKV | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The base's logits [B, S, V] for the prompt, reading the prefix (None: no memory)."""
    return _forward(model, prefix_kv, input_ids, attention_mask, use_cache=False).logits


def _forward(
    model: PreTrainedModel,
    prefix_kv: PrefixKV | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    use_cache: bool,
) -> CausalLMOutputWithPast:
    """The layers read a given cache whether or not `use_cache` asks for it back."""
    positions = prompt_positions(attention_mask)
    if prefix_kv is None:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=use_cache,
        )
    mask = torch.cat([prefix_kv.mask.to(attention_mask.dtype), attention_mask], dim=1)
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=use_cache,
        **{CACHE: prefix_kv.cache(model)},
    )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, as decoder-only generation needs."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def generate_with_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix_kv: PrefixKV | None,
    questions: Sequence[str],
    contexts: Sequence[str | None] | None = None,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers to a batch of questions, one prefix row per question."""
    prompts = [
        qa_prompt(tokenizer, q, contexts[i] if contexts else None) for i, q in enumerate(questions)
    ]
    texts = continue_with_prefix(model, tokenizer, prefix_kv, prompts, max_new_tokens)
    return [clean_answer(t) for t in texts]


@torch.no_grad()
def continue_with_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix_kv: PrefixKV | None,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy continuations of raw prompts to the end of their line, one prefix row each."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    stop = torch.tensor(answer_stop_ids(tokenizer), device=device)
    out = _forward(model, prefix_kv, ids, mask, use_cache=True)
    cache = out[CACHE]
    full_mask = mask if prefix_kv is None else torch.cat([prefix_kv.mask.to(mask.dtype), mask], 1)
    position = prompt_positions(mask)[:, -1:]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)
        for row in torch.nonzero(~done).flatten().tolist():
            generated[row].append(int(token[row]))
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        full_mask = torch.cat([full_mask, full_mask.new_ones(len(prompts), 1)], dim=1)
        position = position + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=full_mask,
            position_ids=position,
            use_cache=True,
            **{CACHE: cache},
        )
        cache = out[CACHE]
    return tokenizer.batch_decode(generated, skip_special_tokens=True)
