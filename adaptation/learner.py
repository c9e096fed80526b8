"""The one way a document is learned: by the worker's LoRA modes and by `uptake eval`'s gradient
strategies alike, so what the evaluation measures is what the service does.

A document is learned as its text's chunks (each its own weighted update, scaled by the
document's trust), then its self-edit sequences in padded micro-batches, and with rehearsal a few
earlier documents again after it (`adaptation/rehearsal.py`). Several documents that queued up
may be learned together (`Learner.learn_together`): those of one chunk, without self-edits and
of one trust take one step on a padded micro-batch, which costs less per document than a step
each. `Knowledge` is the interface every way of folding documents into a model answers to: the
worker's modes and the evaluation's strategies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.data import Document
from adaptation.modeling import (
    LoraSettings,
    attach_lora,
    context_window,
    lora_config,
    seeded,
    without_adapters,
)
from adaptation.prompts import DEFAULT_SELF_EDIT_PROMPT, self_edit_request
from adaptation.rehearsal import RehearsalMemory, Remembered, doc_seed
from adaptation.self_edit import (
    apply_with_self_edits,
    parse_self_edits,
    training_sequences,
    write_generations,
)
from adaptation.self_edit_cache import SelfEditCache
from adaptation.trust import apply_trusted, tag_text
from adaptation.updater import OnlineUpdater, StepReport, UpdateConfig
from adaptation.weighting.base import WeightedText, Weighter, encode_weighted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What learning one document did, as the worker records it on the document."""

    applied: bool
    tokens: int = 0
    reason: str | None = None
    # How the document was learned (None: not a notion of this way of learning).
    trust: float | None = None
    sequences: int | None = None
    self_edit_sequences: int | None = None
    note: str | None = None
    rehearsed: int | None = None  # earlier documents learned again beside it
    # The ids of the documents learned in one micro-batch with it, itself included (None: it
    # was learned alone); a forget's replay learns them together again.
    batch: tuple[str, ...] | None = None


class Knowledge(Protocol):
    """A way of folding documents into a model and answering from it: each mode of the worker
    and each strategy of `uptake eval`."""

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        """Learn the document, its update scaled by `trust` in [0, 1] where updates are scaled.
        The same document must be learned the same way every time, since a forget replays a
        lineage and expects the lineage's result."""
        ...

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        """Greedy answers, closed-book, or with each question's context in its prompt."""
        ...

    def memory_bytes(self) -> int:
        """What it keeps to answer from beyond the base model."""
        ...


@dataclass(frozen=True)
class SelfEditWriting:
    """Self-edits the bare base writes for a document that comes without any (SEAL)."""

    k: int = 1
    prompt: str = DEFAULT_SELF_EDIT_PROMPT
    max_new_tokens: int = 128
    cache_dir: Path | None = None  # None: written anew each time (see adaptation.self_edit_cache)


@dataclass(frozen=True)
class LearnSettings:
    """How a document becomes updates. The defaults are the service's (`UPTAKE_CHUNK_CHARS`,
    `UPTAKE_MAX_DOC_TOKENS`, `UPTAKE_REHEARSE`, `UPTAKE_REHEARSAL_WINDOW`)."""

    chunk_chars: int = 4000  # long texts and self-edits are split here, so none is truncated
    max_doc_tokens: int = 1024  # tokens per update
    tag_salt: str | None = None  # with a salt, every sequence opens with its source's tag (IML)
    write: SelfEditWriting | None = None  # None: only supplied self-edits are learned
    epochs: int = 1  # passes over the document's training sequences
    # Earlier documents learned again with each new one (0: none, and none are remembered),
    # drawn from the most recent `rehearsal_window` learned.
    rehearse: int = 0
    rehearsal_window: int = 64
    # At most this many queued documents handed to `Learner.learn_together` at once by the
    # worker and the eval's stream (1: one by one). The learner learns together what it is
    # given, so a replay learns a recorded micro-batch together whatever this is now.
    learn_batch: int = 1


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut long text at whitespace so no part is silently truncated by the token limit."""
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\n", start, end))
            if cut > start:
                end = cut
        chunks.append(text[start:end])
        start = end
    return [c for c in chunks if c.strip()]


def fit_passage(
    tokenizer: PreTrainedTokenizerBase, prompt: str, title: str | None, text: str, budget: int
) -> str | None:
    """The longest head of `text` whose self-edit prompt takes at most `budget` tokens (None:
    not even one token of it fits)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    keep = len(offsets)
    while keep > 0:
        head = text[: offsets[keep - 1][1]]
        rendered = self_edit_request(tokenizer, prompt, title, head)
        used = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if used <= budget:
            return head
        keep -= max(1, used - budget)
    return None


def edit_sequences(doc: Document, edits: Sequence[str], chunk_chars: int) -> list[str]:
    """Parsed self-edits as the document's training sequences: split like its text (so nothing
    is cut off by the token limit), each headed by its title, minus repeats of its text."""
    pieces = [p for e in edits for p in split_text(e, chunk_chars)]
    return training_sequences(doc.title, doc.text, pieces)[1:]  # [0] is the text itself


def fresh_adapter(
    model: PreTrainedModel | PeftModel, lora: LoraSettings, seed: int, name: str = "default"
) -> PeftModel:
    """A new trainable LoRA adapter initialised from `seed` (added beside the others when `model`
    already carries adapters), so the same seed always starts from the same weights: a replay
    from version 0 starts where its lineage did, and the eval starts where the worker does."""
    with seeded(seed):
        if isinstance(model, PeftModel):
            model.add_adapter(name, lora_config(model, lora))
            return model
        return attach_lora(model, lora, adapter_name=name)


@dataclass(frozen=True)
class _Lesson:
    """Training sequences ready for a pass, with the trust that scales them: one document's
    chunks (a step each) and self-edits, or, `together`, one chunk from each of several
    documents (one step on them all)."""

    chunks: list[WeightedText]
    edits: list[str]
    edit_tokens: int
    trust: float
    together: bool = False


@dataclass(frozen=True)
class _Item:
    """A new document to learn: its self-edit sequences (kept for rehearsal) and its lesson."""

    doc: Document
    edits: list[str]
    lesson: _Lesson

    @property
    def stackable(self) -> bool:
        """One chunk and no self-edits: its update is one step on one sequence, which may share
        a padded micro-batch with others of the same trust."""
        return len(self.lesson.chunks) == 1 and not self.lesson.edits


def _untrusted(doc: Document) -> IngestResult:
    """Trust 0: recorded as applied, deliberately not learned."""
    who = f"source {doc.source!r}" if doc.source else "a document without a source"
    note = f"trust 0 for {who}: recorded as applied but deliberately not learned"
    return IngestResult(applied=True, trust=0.0, sequences=0, self_edit_sequences=0, note=note)


class Learner:
    """Learns documents into the trainable parameters of `model` (a LoRA adapter, or every
    weight for full fine-tuning) through one `OnlineUpdater`, whose optimizer lives as long as
    the learner."""

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        weighter: Weighter,
        update: UpdateConfig,
        settings: LearnSettings | None = None,
    ) -> None:
        self.settings = settings or LearnSettings()
        if self.settings.write is not None and not isinstance(model, PeftModel):
            raise ValueError(
                "writing self-edits needs a LoRA model: the bare base writes them, adapter off"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.weighter = weighter
        self.updater = OnlineUpdater(model, update)
        s = self.settings
        self.memory = RehearsalMemory(s.rehearsal_window if s.rehearse else 0)

    def learn(self, doc: Document, trust: float = 1.0) -> IngestResult:
        """Steps on each chunk of the text, then on the self-edit sequences in padded
        micro-batches, every update scaled by `trust` (0: nothing is learned, nor remembered).

        With `rehearse` = k, each pass then learns k earlier documents again, each as it was
        learned (its chunks, its self-edits, its trust), oldest first. After the new document
        rather than before: the new document's steps are what pull the adapter away from the
        earlier ones, and the rehearsal that follows pulls it back, while the new document is
        revisited first in the next pass. Whole documents rather than a mixed micro-batch:
        a rehearsed document's update is then exactly the one it had when learned. Rehearsal
        steps stay out of the explosion check's record, and out of the result's tokens.
        """
        return self._learn([self._item(doc, trust)])[0]

    def learn_together(self, items: Sequence[tuple[Document, float]]) -> list[IngestResult]:
        """Learn documents that queued up, in order, a result each. Consecutive ones of one
        chunk, without self-edits and of the same trust share one padded micro-batch: one step
        per pass (the updater's tokens-normalised loss over the batch), then rehearsal as after
        one document. The rest are learned one by one, as `learn` does: a document of several
        chunks or with self-edits takes several steps of its own, so stacking it would change
        its update."""
        runs: list[list[_Item]] = []
        for doc, trust in items:
            item = self._item(doc, trust)
            last = runs[-1] if runs else None
            if last and item.stackable and last[0].stackable and last[0].lesson.trust == trust:
                last.append(item)
            else:
                runs.append([item])
        return [result for run in runs for result in self._learn(run)]

    def _item(self, doc: Document, trust: float) -> _Item:
        """The document ready to learn; at trust 0 nothing is weighed or written for it."""
        if trust == 0.0:
            return _Item(doc, [], _Lesson([], [], 0, trust))
        edits = self.self_edit_sequences(doc)
        return _Item(doc, edits, self._lesson(doc.text, doc.source, edits, trust))

    def _learn(self, items: Sequence[_Item]) -> list[IngestResult]:
        """One document as its own lesson, or several stackable ones of one trust as one
        micro-batch; `epochs` passes, each followed by rehearsal of earlier documents chosen
        with the first one's id; the applied are remembered, in order."""
        s = self.settings
        trust = items[0].lesson.trust
        if trust == 0.0:
            return [_untrusted(item.doc) for item in items]
        together = len(items) > 1
        lesson = (
            _Lesson([i.lesson.chunks[0] for i in items], [], 0, trust, together=True)
            if together
            else items[0].lesson
        )
        earlier = [
            self._lesson(e.text, e.source, e.edits, e.trust)
            for e in self.memory.choose(items[0].doc.id, s.rehearse)
        ]
        reports: list[StepReport] = []
        tokens = passes = 0  # a micro-batch's passes that stepped: each counts its tokens
        for _ in range(s.epochs):
            steps, trained = self._pass(lesson)
            reports += steps
            tokens += trained
            passes += any(r.applied for r in steps)
            with self.updater.unrecorded():
                for rehearsed in earlier:
                    self._pass(rehearsed)
        applied = any(r.applied for r in reports)
        reasons = [r.reason for r in reports if not r.applied and r.reason]
        batch = tuple(i.doc.id for i in items) if together else None
        results = [
            IngestResult(
                # Nothing long enough to learn from is a no-op, not a failure.
                applied or not reasons,
                i.lesson.chunks[0].num_tokens * passes if together else tokens,
                "; ".join(reasons) or None,
                trust=trust,
                sequences=len(i.lesson.chunks) + len(i.lesson.edits),
                self_edit_sequences=len(i.lesson.edits),
                note=f"learned in a micro-batch of {len(items)}" if together else None,
                rehearsed=len(earlier) if s.rehearse else None,
                batch=batch,
            )
            for i in items
        ]
        if results[0].applied:
            for item in items:
                self.remember(item.doc, trust, item.edits)
        return results

    def remember(self, doc: Document, trust: float, edits: Sequence[str] | None = None) -> None:
        """Keep the document for rehearsal (a no-op without it), with its self-edit sequences
        (`edits`, else those `self_edit_sequences` gives). Best-of-k calls it for the candidate
        it kept, since every candidate was remembered as it was learned."""
        if self.memory.window and trust > 0.0:
            kept = self.self_edit_sequences(doc) if edits is None else edits
            self.memory.remember(
                Remembered(doc.id, doc.text, doc.title, doc.source, trust, tuple(kept))
            )

    def _lesson(self, text: str, source: str | None, edits: Sequence[str], trust: float) -> _Lesson:
        """The text's weighted chunks (those long enough to learn from) and the self-edit
        sequences, tagged with their source when the settings tag."""
        s = self.settings
        chunks = [
            encode_weighted(
                self._tagged(chunk, source), self.tokenizer, self.weighter, s.max_doc_tokens
            )
            for chunk in split_text(text, s.chunk_chars)
        ]
        tagged = [self._tagged(e, source) for e in edits]
        return _Lesson(
            [c for c in chunks if c.num_tokens >= 2], tagged, self._tokens(tagged), trust
        )

    def _pass(self, lesson: _Lesson) -> tuple[list[StepReport], int]:
        """One pass over a lesson: a step per chunk (one step on them all when `together`),
        then its self-edits in micro-batches; the reports, and the tokens of what was learned."""
        reports: list[StepReport] = []
        tokens = 0
        for batch in [lesson.chunks] if lesson.together else [[c] for c in lesson.chunks]:
            steps = apply_trusted(self.updater, batch, lesson.trust)
            tokens += sum(c.num_tokens for c in batch) if any(r.applied for r in steps) else 0
            reports += steps
        if lesson.edits:
            steps = apply_with_self_edits(
                self.updater,
                self.tokenizer,
                self.weighter,
                lesson.edits,
                trust=lesson.trust,
                max_length=self.settings.max_doc_tokens,
            )
            tokens += lesson.edit_tokens if any(r.applied for r in steps) else 0
            reports += steps
        return reports, tokens

    def self_edit_sequences(self, doc: Document) -> list[str]:
        """The document's self-edits as training sequences: parsed from those it came with,
        else (when writing) those the base writes now."""
        if doc.self_edits:
            raw: Sequence[str] = doc.self_edits
        elif self.settings.write is not None:
            raw = self.written_self_edits(doc, self.settings.write)
        else:
            return []
        edits = [e for g in raw for e in parse_self_edits(g)]
        return edit_sequences(doc, edits, self.settings.chunk_chars)

    def memory_bytes(self) -> int:
        """The trained parameters (a fixed-size adapter, or the whole base): they do not grow
        with the documents learned."""
        return sum(p.numel() * p.element_size() for p in self.updater.params)

    def _tagged(self, text: str, source: str | None) -> str:
        salt = self.settings.tag_salt
        return text if salt is None else tag_text(text, source, salt)

    def _tokens(self, sequences: list[str]) -> int:
        if not sequences:
            return 0
        ids = self.tokenizer(
            sequences,
            add_special_tokens=False,
            truncation=True,
            max_length=self.settings.max_doc_tokens,
        )["input_ids"]
        return sum(len(i) for i in ids)

    def written_self_edits(self, doc: Document, write: SelfEditWriting) -> list[str]:
        """`write.k` self-edits (raw generations, parsed as supplied ones are) written by the
        bare base, so what is written does not depend on what has been learned, and sampled with
        a seed from the document's id, so a forget's replay writes the same ones; read back from
        `write.cache_dir` when it holds them. The prompt holds as much of the text as fits in
        the context beside the new tokens."""
        limit = context_window(self.model)
        passage = (
            doc.text
            if limit is None
            else fit_passage(
                self.tokenizer, write.prompt, doc.title, doc.text, limit - write.max_new_tokens
            )
        )
        if passage is None:
            log.warning("learner: no room to write self-edits for %s; learning its text", doc.id)
            return []
        request = self_edit_request(self.tokenizer, write.prompt, doc.title, passage)
        cache = SelfEditCache(write.cache_dir) if write.cache_dir is not None else None
        with without_adapters(self.model):
            return write_generations(
                self.model,
                self.tokenizer,
                request,
                write.k,
                write.max_new_tokens,
                doc_seed(doc.id),
                cache,
                prompt=write.prompt,
                title=doc.title,
            )
