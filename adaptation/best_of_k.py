"""Best-of-k self-edits, SEAL's reward without its RL, run at ingest time: each candidate
self-edit is learned from the same saved adapter and optimizer state, scored on probe questions,
and only the best is kept.

Probe questions are written by the bare base from the document (never its gold questions), and
answered by it with the document in context: those answers are the reference the trained
adapter's closed-book answers are scored against (F1, the answers' NLL breaking ties). Writing is
greedy, so a forget's replay scores and keeps the same candidate. When gold questions are given
too (the eval), each candidate is scored on them as well, to check the probes against them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Generic, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.answering import SCORED_ANSWER_TOKENS, generate_answers
from adaptation.data import QA, Document
from adaptation.learner import IngestResult, Learner, fit_passage
from adaptation.metrics import score
from adaptation.modeling import context_window, without_adapters
from adaptation.prompts import answer_batch, probe_template, qa_tokens, self_edit_request
from adaptation.self_edit import parse_self_edits, write_generations
from adaptation.self_edit_cache import SelfEditCache
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


# A label the model may open a question with ("Q1:", "Question 2.").
_QUESTION_LABEL = re.compile(r"^(?:q(?:uestion)?\s*\d*\s*[:.)-])\s*", re.IGNORECASE)
MIN_QUESTION_WORDS = 3


def parse_questions(generated: str) -> list[str]:
    """The questions in a generation: each line's text up to its first question mark, list
    markers and "Question:" labels removed; answers, fragments and repeats dropped."""
    out: list[str] = []
    for chunk in parse_self_edits(generated, min_words=1):
        for line in chunk.splitlines():
            head, mark, _ = _QUESTION_LABEL.sub("", line.strip()).partition("?")
            question = f"{head.strip()}?"
            if mark and len(head.split()) >= MIN_QUESTION_WORDS and question not in out:
                out.append(question)
    return out


@dataclass(frozen=True)
class ProbeWriting:
    """How the base writes the probe questions candidates are scored on."""

    questions: int = 5
    max_new_tokens: int = 160


@torch.no_grad()
def write_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    title: str | None,
    passage: str,
    writing: ProbeWriting | None = None,
    cache: SelfEditCache | None = None,
) -> list[QA]:
    """Questions the model writes about the document (greedy; read back from `cache` when
    there), each with the answer it reads from the document in context; questions it cannot
    answer there are dropped. Run it on the bare base (`without_adapters`) for probes that do
    not depend on what has been learned."""
    w = writing or ProbeWriting()
    template = probe_template(w.questions)
    limit = context_window(model)
    head = (
        passage
        if limit is None
        else fit_passage(tokenizer, template, title, passage, limit - w.max_new_tokens)
    )
    if not head:
        return []
    request = self_edit_request(tokenizer, template, title, head)
    generated = write_generations(
        model, tokenizer, request, 1, w.max_new_tokens, 0, cache, 0.0, prompt="probe-questions"
    )
    questions = parse_questions(generated[0])[: w.questions]
    if not questions:
        return []
    context = f"{title.strip()}\n{head}" if title and title.strip() else head
    answers = generate_answers(
        model,
        tokenizer,
        questions,
        contexts=[context] * len(questions),
        max_new_tokens=SCORED_ANSWER_TOKENS,
    )
    return [QA(q, (a,)) for q, a in zip(questions, answers, strict=True) if a.strip()]


@dataclass(frozen=True)
class BestOfK(Generic[T]):
    probe: list[ProbeScore]
    chosen: int
    results: list[T]  # what each candidate's training returned
    gold: list[ProbeScore] | None = None
    scoring: Scoring = "f1"


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
    return BestOfK(
        probe_scores, chosen, results, gold_scores if gold is not None else None, scoring
    )


def learn_best_of(
    learner: Learner,
    doc: Document,
    candidates: Sequence[str],
    trust: float = 1.0,
    probes: Sequence[QA] | None = None,
    gold: Sequence[QA] | None = None,
    scoring: Scoring = "f1",
    max_new_tokens: int = SCORED_ANSWER_TOKENS,
    cache: SelfEditCache | None = None,
) -> tuple[IngestResult, BestOfK[IngestResult] | None]:
    """Learn the document with the best of the candidate self-edits (each a generation, parsed
    as a supplied one is), scored on `probes` (default: written by the bare base, cached in
    `cache`). With fewer than two candidates, no probe, or trust 0, it is learned with them
    all, as plain seal."""
    if len(candidates) > 1 and trust > 0 and probes is None:
        with without_adapters(learner.model):
            probes = write_probes(
                learner.model, learner.tokenizer, doc.title, doc.text, cache=cache
            )
    if len(candidates) < 2 or trust == 0 or not probes:
        return learner.learn(replace(doc, self_edits=tuple(candidates)), trust), None
    trainings = [partial(learner.learn, replace(doc, self_edits=(c,)), trust) for c in candidates]
    choice = best_of_k(
        learner.updater, learner.tokenizer, trainings, probes, gold, scoring, max_new_tokens
    )
    kept = choice.results[choice.chosen]
    if kept.applied:  # every candidate was remembered as it was learned: keep the winner's
        learner.remember(replace(doc, self_edits=(candidates[choice.chosen],)), trust)
    note = f"best of {len(candidates)} self-edits: #{choice.chosen}, probe F1 "
    note += f"{choice.probe[choice.chosen].f1:.2f} on {len(probes)} probes"
    return replace(kept, note="; ".join(filter(None, (kept.note, note)))), choice


def learn_written_best_of(
    learner: Learner, doc: Document, k: int, trust: float = 1.0
) -> IngestResult:
    """Mode seal with best-of-k: a document sent without self-edits gets k written by the bare
    base (the learner's writing settings, k of them), and only the best is learned. One that
    brings its own is learned with all of them: what a client sent is not second-guessed."""
    write = learner.settings.write
    if doc.self_edits or write is None or trust == 0 or k < 2:
        return learner.learn(doc, trust)
    written = learner.written_self_edits(doc, replace(write, k=k))
    cache = SelfEditCache(write.cache_dir) if write.cache_dir is not None else None
    return learn_best_of(learner, doc, written, trust, cache=cache)[0]
