"""Self-edits (SEAL): the model writes training text about a document, and the update learns that
text together with the document itself.

A self-edit is one generation; it is split into separate training sequences (on blank lines,
`---` rules or list items), each prefixed with the document's title so that a sequence read alone
still says who or what it is about. The original passage is always trained on as well.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.data import QA
from adaptation.modeling import seeded
from adaptation.prompts import (
    end_token_ids,
    read_qa_text,
)
from adaptation.self_edit_cache import SelfEditCache, model_identity
from adaptation.trust import apply_trusted
from adaptation.updater import OnlineUpdater, StepReport
from adaptation.weighting.base import Weighter, encode_weighted

MIN_WORDS = 4
LABEL_WORDS = 8

# A horizontal rule, or a rule-framed label such as "--- Passage 2 ---".
_RULE = re.compile(r"^(?:-{3,}|\*{3,}|_{3,}|={3,})")
_HEADING = re.compile(r"^#{1,6}\s")
_ITEM = re.compile(r"^(?:\d{1,2}[.)]|[-*\u2022])(?:\s+|$)")


def _split_item(line: str) -> tuple[bool, str]:
    """Whether the line opens a list item, and the line without its marker (bold kept)."""
    plain = line.removeprefix("**")
    m = _ITEM.match(plain)
    if m is None:
        return False, line
    rest = plain[m.end() :].strip()
    return True, f"**{rest}" if line.startswith("**") else rest


def parse_self_edits(generated: str, min_words: int = MIN_WORDS) -> list[str]:
    """Split one generation into training sequences.

    Sequences end at blank lines, `---`-style rules and markdown headings, and every list item
    ("1. ", "2) ", "- ") starts a new one. Bold and italic markers are removed. Headings and the short label
    lines models put before each part ("Rewrites:", "**Passage 2**") are dropped, as is any
    chunk under `min_words` words; repeats are kept once.
    """
    chunks: list[list[str]] = [[]]
    for raw in generated.splitlines():
        line = raw.strip()
        if not line or _RULE.match(line) or _HEADING.match(line):
            chunks.append([])
            continue
        is_item, line = _split_item(line)
        if is_item:
            chunks.append([])
        bold = len(line) > 4 and line.startswith("**") and line.endswith("**")
        line = line.replace("**", "").strip("* ")
        label = line.endswith(":") or (bold and not line.endswith((".", "!", "?")))
        if not chunks[-1] and label and len(line.split()) < LABEL_WORDS:
            continue
        if line:
            chunks[-1].append(line)
    out: list[str] = []
    for lines in chunks:
        text = "\n".join(lines).strip()
        if len(text.split()) >= min_words and text not in out:
            out.append(text)
    return out


def _titled(title: str | None, text: str) -> str:
    """The text under a title line; text that already opens with that line keeps it once."""
    text = text.strip()
    heading = (title or "").strip()
    if not text or not heading or text.split("\n", 1)[0].strip() == heading:
        return text
    return f"{heading}\n{text}"


def training_sequences(title: str | None, passage: str, edits: Sequence[str]) -> list[str]:
    """The passage first, then each parsed edit; all title-prefixed, empties and repeats dropped."""
    out: list[str] = []
    for text in (passage, *edits):
        seq = _titled(title, text)
        if seq and seq not in out:
            out.append(seq)
    return out


@torch.no_grad()
def sample_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    k: int,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
) -> list[str]:
    """k sampled continuations of one model-input prompt (see `adaptation.prompts`; one greedy
    one when temperature is 0).

    Unlike answering, decoding runs past newlines, to the end of the turn: self-edits span many
    lines. Seed torch for repeatable samples.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"].to(device)
    sampling: dict[str, object] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "num_return_sequences": k}
        if temperature > 0
        else {"do_sample": False}
    )
    try:
        gen = model.generate(
            input_ids=ids,
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_token_ids(tokenizer),
            **sampling,
        )
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)


def write_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: str,
    k: int,
    max_new_tokens: int,
    seed: int,
    cache: SelfEditCache | None = None,
    temperature: float = 1.0,
    **about: str | None,
) -> list[str]:
    """k generations for a rendered request, sampled on generators seeded with `seed` (so the
    same request and seed always write the same ones), or read back from `cache`, keyed by all
    that decides them. `about` (the prompt's name, the title) is stored beside them for people."""

    def write() -> list[str]:
        with seeded(seed):
            return sample_generations(model, tokenizer, request, k, max_new_tokens, temperature)

    if cache is None:
        return write()
    parts = {
        "model": model_identity(model),
        "request": request,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        **about,
    }
    return cache.get_or_write(parts, write, **about)


def parse_qa_pairs(generated: str) -> list[QA]:
    """Question/answer pairs from a self-QA generation, in the QA prompt's own format."""
    pairs: list[QA] = []
    for chunk in parse_self_edits(generated, min_words=2):
        pair = read_qa_text(chunk)
        if pair is not None:
            pairs.append(QA(pair[0], (pair[1],)))
    return pairs


def apply_with_self_edits(
    updater: OnlineUpdater,
    tokenizer: PreTrainedTokenizerBase,
    weighter: Weighter,
    sequences: Sequence[str],
    batch_size: int = 8,
    trust: float = 1.0,
    max_length: int = 1024,
) -> list[StepReport]:
    """Train on the sequences in padded micro-batches (padding is masked out of the loss).

    Each micro-batch gets the updater's `steps_per_doc` steps; `trust` scales the update as
    `apply_trusted` does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [encode_weighted(s, tokenizer, weighter, max_length) for s in sequences if s.strip()]
    reports: list[StepReport] = []
    for start in range(0, len(encoded), batch_size):
        reports.extend(apply_trusted(updater, encoded[start : start + batch_size], trust))
    return reports
