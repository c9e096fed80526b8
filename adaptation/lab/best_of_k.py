"""Best-of-k self-edits: try each candidate on a temporary copy of the adapter, keep the one whose
update answers probe questions best.

Every candidate starts from the same adapter and optimizer state (copied in memory; the base is
never reloaded). Probe questions are supplied, or written by the model from the document with the
self-QA prompt. When the document's real (gold) questions are given too, each candidate is scored
on them as well, so the probe score can be checked against what it stands in for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.answering import generate_answers
from adaptation.data import QA
from adaptation.metrics import score
from adaptation.prompts import answer_batch, qa_tokens, self_edit_request
from adaptation.self_edit import parse_qa_pairs, sample_generations
from adaptation.updater import OnlineUpdater, UpdaterSnapshot

Scoring = Literal["f1", "nll"]
T = TypeVar("T")


@torch.no_grad()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
) -> list[float]:
    """Per (question, answer): mean NLL of the answer tokens after the closed-book QA prompt."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    try:
        for start in range(0, len(pairs), batch_size):
            seqs = [qa_tokens(tokenizer, q, a) for q, a in pairs[start : start + batch_size]]
            ids, labels, mask = answer_batch(seqs, pad_id=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            targets = labels[:, 1:].to(device)
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
            counts = (targets != -100).sum(dim=1).clamp(min=1)
            out.extend((nll.sum(dim=1) / counts).tolist())
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class ProbeScore:
    f1: float
    nll: float

    def key(self, scoring: Scoring) -> tuple[float, float]:
        """Higher is better; the other measure breaks ties (F1 on a few probes often ties)."""
        return (self.f1, -self.nll) if scoring == "f1" else (-self.nll, self.f1)


def probe_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[QA],
    max_new_tokens: int = 12,
) -> ProbeScore:
    """Closed-book F1 on the probes, and the mean NLL of their first gold answers."""
    usable = [q for q in probes if q.answers]
    if not usable:
        raise ValueError("probe scoring needs at least one question with an answer")
    preds = generate_answers(
        model, tokenizer, [q.question for q in usable], max_new_tokens=max_new_tokens
    )
    f1 = score(preds, [list(q.answers) for q in usable])["f1"]
    nlls = answer_nll(model, tokenizer, [(q.question, q.answers[0]) for q in usable])
    return ProbeScore(f1=float(f1), nll=float(np.mean(nlls)))


def generate_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    title: str | None,
    passage: str,
    samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> list[QA]:
    """Probe questions written by the model from the document with the self-QA prompt."""
    text = self_edit_request(tokenizer, "self-qa", title, passage)
    gens = sample_generations(model, tokenizer, text, samples, max_new_tokens, temperature)
    probes: list[QA] = []
    for g in gens:
        probes.extend(p for p in parse_qa_pairs(g) if p not in probes)
    return probes


@dataclass(frozen=True)
class BestOfK(Generic[T]):
    probe: list[ProbeScore]
    chosen: int
    results: list[T]  # what each candidate's training returned
    gold: list[ProbeScore] | None = None


def best_of_k(
    updater: OnlineUpdater,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Sequence[Callable[[], T]],
    probes: Sequence[QA],
    gold: Sequence[QA] | None = None,
    scoring: Scoring = "f1",
    max_new_tokens: int = 12,
) -> BestOfK[T]:
    """Train each candidate (a call that trains through `updater`, e.g. a learner learning the
    document with one self-edit) from the same starting state, score it on the probes (and on
    `gold` if given), and leave the updater in the best candidate's state."""
    if not candidates:
        raise ValueError("best-of-k needs at least one candidate to train")
    model = updater.model
    start = updater.snapshot()
    ends: list[UpdaterSnapshot] = []
    probe_scores: list[ProbeScore] = []
    gold_scores: list[ProbeScore] = []
    results: list[T] = []
    for i, train in enumerate(candidates):
        if i:
            updater.restore(start)
        results.append(train())
        probe_scores.append(probe_score(model, tokenizer, probes, max_new_tokens))
        if gold is not None:
            gold_scores.append(probe_score(model, tokenizer, gold, max_new_tokens))
        ends.append(updater.snapshot())
    chosen = max(range(len(candidates)), key=lambda i: probe_scores[i].key(scoring))
    updater.restore(ends[chosen])
    return BestOfK(probe_scores, chosen, results, gold_scores if gold is not None else None)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def correlation(probe: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation of probe scores with gold scores (NaN when either is
    constant or there are fewer than two points)."""
    if len(probe) != len(gold):
        raise ValueError(
            f"need as many probe scores as gold scores, got {len(probe)} and {len(gold)}"
        )
    x = np.asarray(probe, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    if len(x) < 2:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": len(x)}
    return {"pearson": _pearson(x, y), "spearman": _pearson(_ranks(x), _ranks(y)), "n": len(x)}
