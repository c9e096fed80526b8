"""The QA prompt format, as text and as training tokens: used by pretraining, meta-training,
evaluation and the service alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

ANSWER_END = "\n"
# Label of the positions the loss skips (transformers' and cross_entropy's convention).
IGNORE = -100


def qa_prompt(question: str, context: str | None = None) -> str:
    """The text the model continues with its answer. Context is only for retrieval modes."""
    q = " ".join(question.split())
    if context:
        return f"Context: {' '.join(context.split())}\nQuestion: {q}\nAnswer:"
    return f"Question: {q}\nAnswer:"


def qa_example(question: str, answer: str, context: str | None = None) -> tuple[str, str]:
    """A (prompt, completion) pair for training: the completion is what the loss is taken on."""
    return qa_prompt(question, context), f" {answer.strip()}{ANSWER_END}"


def qa_tokens(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, context: str | None = None
) -> tuple[list[int], int]:
    """A QA training example as (prompt + completion ids, prompt length): the loss is taken on
    the ids from the prompt length on."""
    prompt, completion = qa_example(question, answer, context)
    p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return p + c, len(p)


def answer_batch(
    seqs: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels, attention mask) for (ids, loss start) pairs; labels are
    `IGNORE` before each loss start and on padding."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, start : len(s)] = torch.tensor(s[start:])
        mask[i, : len(s)] = 1
    return ids, labels, mask


def clean_answer(generated: str) -> str:
    """Cut a generation at the end of its first line: the model's answer stops there."""
    return generated.split(ANSWER_END, 1)[0].strip()
