"""Closed-book (or retrieval-augmented) answering: the prompt format plus greedy decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.prompts import answer_stop_ids, clean_answer, qa_prompt

# New tokens an answer that is scored may run to (the eval, the update guard's probes): room for
# a sentence, too little for a long answer to game recall by listing candidates.
SCORED_ANSWER_TOKENS = 32


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    contexts: Sequence[str | None] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    **generate_kwargs: object,
) -> list[str]:
    """Greedy answers, batched with left padding as decoder-only generation needs."""
    prompts = [
        qa_prompt(tokenizer, q, contexts[i] if contexts else None) for i, q in enumerate(questions)
    ]
    return [
        clean_answer(t)
        for t in generate_batched(
            model, tokenizer, prompts, max_new_tokens, batch_size, **generate_kwargs
        )
    ]


@torch.no_grad()
def generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    **generate_kwargs: object,
) -> list[str]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, cut = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=prompt_budget(model, max_new_tokens),
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=answer_stop_ids(tokenizer),
                **generate_kwargs,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
        model.train(was_training)
    return out


def prompt_budget(model: PreTrainedModel, max_new_tokens: int) -> int:
    """Prompts longer than the model's window lose their start (old context), never the question."""
    window = getattr(model.config, "max_position_embeddings", None) or 2048
    return max(16, int(window) - max_new_tokens)
