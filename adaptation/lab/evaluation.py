"""Evaluation of how strategies take up documents: every strategy starts from the same base,
learns the same documents, and is scored closed-book on their questions, on retention questions
it knew before, and on reading held-out passages in context.

Two protocols. `stream`: one adapter (or store) reads the documents once, in order, and is asked
every document's questions at the end; uptake is F1 after minus F1 before. `single` (SEAL's):
each document is learned alone from a fresh adapter and only its own questions are asked; uptake
is the mean over documents of F1 after minus before. Retention is retention-question F1 after
over before, and reading is in-context F1 after over before. They are always reported beside
uptake, because uptake alone is easy to game. Every gradient strategy learns a document through
the learning core's `Learner`, the worker's own code.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from adaptation.answering import SCORED_ANSWER_TOKENS, generate_answers
from adaptation.best_of_k import BestOfK, Scoring, learn_best_of, write_probes
from adaptation.data import QA, Document, all_questions, read_documents
from adaptation.lab.probe_agreement import correlation
from adaptation.learner import (
    IngestResult,
    Learner,
    LearnSettings,
    SelfEditWriting,
    fresh_adapter,
)
from adaptation.mac.bank import MemoryBank
from adaptation.mac.knowledge import BankKnowledge
from adaptation.mac.system import MacSystem
from adaptation.metrics import score
from adaptation.modeling import LoraSettings, dtype_named, load_base, without_adapters
from adaptation.prompts import DEFAULT_SELF_EDIT_PROMPT
from adaptation.retrieval import Retriever, as_context, embed
from adaptation.self_edit_cache import SelfEditCache, default_cache_dir
from adaptation.trust import SourceTrust
from adaptation.updater import UpdateConfig, UpdaterSnapshot
from adaptation.weighting import Weighter, make_weighter

UPDATE_STRATEGIES = ("uniform", "salient", "tfidf", "camels", "seal", "seal-best")
EvalProtocol = Literal["stream", "single"]
SelfEditSource = Literal["own", "supplied"]


@dataclass
class EvalConfig:
    strategies: tuple[str, ...] = ("uniform", "salient", "tfidf", "rag")
    protocol: EvalProtocol = "stream"
    lr: float = 1e-3
    steps_per_doc: int = 1
    normalisation: str = "tokens"
    # The adapter and the way a document is learned: the service's own settings types, so the
    # defaults are the service's.
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning: LearnSettings = field(default_factory=LearnSettings)
    full_finetune: bool = False
    seeds: tuple[int, ...] = (0,)
    limit: int | None = None
    checkpoints: int = 5
    # Answers are capped here for scoring, so a long answer cannot collect gold tokens (recall).
    max_new_tokens: int = SCORED_ANSWER_TOKENS
    rag_k: int = 3
    # rag, mac, mac+rag: only documents at least this similar to a question (MiniLM cosine) are
    # read for it; -1: all. A question with none is answered closed-book.
    min_similarity: float = -1.0
    weighter_path: str | None = None
    mac_path: str | None = None
    sweep_lrs: tuple[float, ...] = ()
    retention_floor: float = 0.9
    retention_matrix: bool = False
    device: str | None = None
    dtype: str | None = None  # None or "auto": the device's default (adaptation.modeling)
    sweep_steps: tuple[int, ...] = ()
    tuned: dict[str, tuple[float, int]] = field(default_factory=dict)
    trust: dict[str, float] = field(default_factory=dict)
    best_of_k: int = 3
    # seal's self-edits: the documents' own (or the paraphraser's, for a world article), or
    # written by the base (own); None: supplied where a document carries any, else own.
    self_edits: SelfEditSource | None = None
    self_edit_prompt: str | None = None  # None: the service's default prompt
    self_edit_k: int = 1
    self_edit_tokens: int = 128
    self_edit_cache: bool = True  # written self-edits and probes kept under UPTAKE_HOME


class BaseMethod:
    """The unadapted base: the 'before' of every comparison, and what every strategy builds on.
    Every strategy is `Knowledge` (adaptation.learner), as the worker's modes are."""

    name = "base"

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        self.model, self.tokenizer = load_base(
            model_dir, device=cfg.device, dtype=dtype_named(cfg.dtype)
        )
        self.max_new_tokens = cfg.max_new_tokens

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        """The base learns nothing."""
        return IngestResult(applied=True)

    def ingest_together(self, items: Sequence[tuple[Document, float]]) -> list[IngestResult]:
        """Several documents at once (`--learn-batch`): one by one, unless the method learns
        them together as the worker does."""
        return [self.ingest(doc, trust) for doc, trust in items]

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        return generate_answers(
            self.model,
            self.tokenizer,
            questions,
            contexts=contexts,
            max_new_tokens=self.max_new_tokens,
        )

    def memory_bytes(self) -> int:
        """What the method keeps to answer from, beyond the base model."""
        return 0

    def reset(self) -> None:
        """Forget every document read: the single protocol's fresh start for each document."""

    def summary(self) -> dict[str, float]:
        """Method-specific figures for the report (e.g. best-of-k's probe/gold correlation)."""
        return {}


class LoraMethod(BaseMethod):
    """Online LoRA fine-tuning with a token weighting, learned by the worker's own `Learner`
    from the same seeded adapter the worker starts from.

    With `full_finetune` every weight of the base is trained instead, the baseline that says
    whether the adapter's smaller footprint costs uptake or saves retention.
    """

    def __init__(
        self, model_dir: str, weighter: Weighter, cfg: EvalConfig, lr: float, seed: int
    ) -> None:
        super().__init__(model_dir, cfg)
        model = (
            self.model.requires_grad_(True)
            if cfg.full_finetune
            else fresh_adapter(self.model, cfg.lora, seed)
        )
        update = UpdateConfig(
            lr=lr,
            steps_per_doc=cfg.steps_per_doc,
            normalisation=cfg.normalisation,  # type: ignore[arg-type]
        )
        self.learner = Learner(model, self.tokenizer, weighter, update, cfg.learning)
        self.model = model
        self.name = weighter.name
        self._fresh: UpdaterSnapshot | None = None

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        """The document's text alone: learning its self-edits is seal's."""
        return self.learner.learn(replace(doc, self_edits=()), trust)

    def ingest_together(self, items: Sequence[tuple[Document, float]]) -> list[IngestResult]:
        """Through the worker's own `Learner.learn_together`, texts alone."""
        return self.learner.learn_together([(replace(d, self_edits=()), t) for d, t in items])

    def memory_bytes(self) -> int:
        return self.learner.memory_bytes()

    def reset(self) -> None:
        """Back to the state of the first reset, which the single protocol calls before any
        document is learned: the fresh adapter and optimizer, and nothing to rehearse."""
        self.learner.memory.clear()
        updater = self.learner.updater
        if self._fresh is None:
            self._fresh = updater.snapshot()
        else:
            updater.restore(self._fresh)


class SealMethod(LoraMethod):
    """SEAL-style updates: the learner learns the document with its self-edits.

    Self-edits are supplied with the document (e.g. the Qwen rewrites in shared/data), come from
    the template paraphraser for a knowledge-world document (standing in for a capable model;
    its QA lines are left out, since they would reuse the world's own question phrasings), or
    are written by the bare base (`own`, through the learner's own writing, cached).

    With `best_of_k` > 1 (the `seal-best` strategy), each self-edit is a candidate: the document
    is learned with each one from the same state, scored on probe questions, and the best kept
    (`adaptation.best_of_k`). Each candidate is also scored on the document's gold questions, so
    the report can say how well probes stand in.
    """

    def __init__(
        self, model_dir: str, cfg: EvalConfig, lr: float, seed: int, best_of_k: int = 0
    ) -> None:
        super().__init__(model_dir, make_weighter("uniform"), cfg, lr, seed)
        self.name = "seal" if best_of_k < 2 else "seal-best"
        self.best_of_k = best_of_k
        self.source = cfg.self_edits
        self.cache = SelfEditCache(default_cache_dir()) if cfg.self_edit_cache else None
        self.writing = SelfEditWriting(
            max(cfg.self_edit_k, best_of_k),
            cfg.self_edit_prompt or DEFAULT_SELF_EDIT_PROMPT,
            cfg.self_edit_tokens,
            self.cache.directory if self.cache else None,
        )
        self.choices: list[BestOfK[IngestResult]] = []

    # One by one, as the worker's mode seal: self-edits make each document its own lesson.
    ingest_together = BaseMethod.ingest_together

    def generations(self, doc: Document, k: int) -> tuple[str, ...]:
        """The document's self-edits: supplied ones, k from the paraphraser for a world
        article, or those the base writes (own; by default where none is supplied)."""
        from adaptation.lab.paraphrase import paraphrase

        if self.source != "own":
            if doc.self_edits:
                return doc.self_edits
            if doc.meta.get("entity"):
                return tuple(paraphrase(doc, k=k, qa=False))
            if self.source == "supplied":
                return ()
        return tuple(self.learner.written_self_edits(doc, self.writing))

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        gens = self.generations(doc, max(2, self.best_of_k))
        if self.best_of_k < 2 or len(gens) < 2 or not doc.questions:
            return self.learner.learn(replace(doc, self_edits=gens), trust)
        probes, scoring = self.probes(doc)
        result, choice = learn_best_of(
            self.learner,
            doc,
            gens[: self.best_of_k],
            trust,
            probes=probes,
            gold=doc.questions,
            scoring=scoring,
            max_new_tokens=self.max_new_tokens,
        )
        if choice is not None:
            self.choices.append(choice)
        return result

    def probes(self, doc: Document) -> tuple[list[QA], Scoring]:
        """Probe questions for best-of-k, and how to score candidates on them. A world article
        gets the paraphraser's self-QA, asked in other phrasings than the gold questions where
        the templates allow, scored by answer NLL; any other document gets questions the bare
        base writes and answers with the document in context, scored by F1 (SEAL's reward)."""
        from adaptation.lab.paraphrase import paraphrase
        from adaptation.self_edit import parse_qa_pairs

        if doc.meta.get("entity"):
            gold = {q.question for q in doc.questions}
            pairs = [p for g in paraphrase(doc, k=1, seed=1, qa=True) for p in parse_qa_pairs(g)]
            fresh = [p for p in pairs if p.question not in gold]
            if fresh or pairs:
                return fresh or pairs, "nll"
        with without_adapters(self.model):
            written = write_probes(
                self.model, self.tokenizer, doc.title, doc.text, cache=self.cache
            )
        return written, "f1"

    def summary(self) -> dict[str, float]:
        """How well probe scores track gold scores across the candidates, and how often the
        probes picked the candidate that was best on the gold questions."""
        if not self.choices:
            return {}
        probe = [s.nll for c in self.choices for s in c.probe]
        gold = [s.nll for c in self.choices if c.gold for s in c.gold]
        corr = correlation(probe, gold)
        hits = [
            c.chosen == max(range(len(c.gold)), key=lambda i: c.gold[i].key(c.scoring))
            for c in self.choices
            if c.gold
        ]
        return {
            "probe_gold_pearson": corr["pearson"],
            "probe_gold_spearman": corr["spearman"],
            "chose_gold_best": sum(hits) / len(hits),
            "chance": statistics.fmean(1 / len(c.probe) for c in self.choices),
            "candidates": float(len(probe)),
        }


def relevant(
    retriever: Retriever, question: str, k: int, floor: float
) -> list[tuple[str, str, float]]:
    """The k best hits for the question that score at least `floor`."""
    return [hit for hit in retriever.search(question, k) if hit[2] >= floor]


class RagMethod(BaseMethod):
    """Retrieval over the stored documents with the unchanged base: the strong, cheap baseline.
    Trust does not apply: a document is stored or not."""

    name = "rag"

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        super().__init__(model_dir, cfg)
        self.retriever = Retriever()
        self.k, self.floor = cfg.rag_k, cfg.min_similarity

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        self.retriever.add(doc.id, doc.text)
        return IngestResult(applied=True)

    def memory_bytes(self) -> int:
        return self.retriever.nbytes

    def reset(self) -> None:
        self.retriever = Retriever()

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        """With the given contexts (reading), else with what the retriever finds."""
        if contexts is None:
            found = [relevant(self.retriever, q, self.k, self.floor) for q in questions]
            contexts = [as_context(h) if h else None for h in found]
        return super().answer(questions, contexts)


class MacMethod(BankKnowledge, BaseMethod):
    """MAC: each document becomes one modulation in a memory bank; no gradient at ingest."""

    name = "mac"
    # Whether the bank itself retrieves (keys every entry) for the similarity floor; mac+rag
    # retrieves with its own index and names each question's documents.
    bank_retrieves = True

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        BaseMethod.__init__(self, model_dir, cfg)
        system = MacSystem.load(str(cfg.mac_path), self.model, self.tokenizer)
        if cfg.min_similarity > -1.0 and self.bank_retrieves:
            system.embed, system.min_similarity = embed, cfg.min_similarity
        BankKnowledge.__init__(self, system, cfg.max_new_tokens)
        self.reset()

    def reset(self) -> None:
        self.system.bank = MemoryBank(self.system.bank.num_tokens, self.system.bank.width)


class MacRagMethod(MacMethod):
    """MAC over only the retrieved documents' modulations, with their text in context."""

    name = "mac+rag"
    bank_retrieves = False

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        super().__init__(model_dir, cfg)  # its reset() makes the empty bank and index
        self.k, self.floor = cfg.rag_k, cfg.min_similarity

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        self.retriever.add(doc.id, doc.text)
        return super().ingest(doc, trust)

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        """With the given contexts (reading) over the whole bank, else over what is retrieved."""
        if contexts is not None:
            return super().answer(questions, contexts)
        hits = [relevant(self.retriever, q, self.k, self.floor) for q in questions]
        return self.system.answer(
            questions,
            contexts=[as_context(h) if h else None for h in hits],
            doc_ids=[[doc_id for doc_id, _, _ in h] for h in hits],
            max_new_tokens=self.max_new_tokens,
        )

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.retriever.nbytes

    def reset(self) -> None:
        super().reset()
        self.retriever = Retriever()


def make_method(
    name: str, model_dir: str, cfg: EvalConfig, lr: float, seed: int, corpus: list[str]
) -> BaseMethod:
    if name in ("seal", "seal-best"):
        return SealMethod(model_dir, cfg, lr, seed, cfg.best_of_k if name == "seal-best" else 0)
    if name in UPDATE_STRATEGIES:
        weighter = make_weighter(
            name, corpus=corpus, path=cfg.weighter_path if name == "camels" else None
        )
        return LoraMethod(model_dir, weighter, cfg, lr, seed)
    if name == "rag":
        return RagMethod(model_dir, cfg)
    if name in ("mac", "mac+rag"):
        if not cfg.mac_path:
            raise ValueError(
                f"strategy {name!r} needs --mac DIR (a trained MAC from `uptake meta-train mac`)"
            )
        return MacMethod(model_dir, cfg) if name == "mac" else MacRagMethod(model_dir, cfg)
    known = ", ".join((*UPDATE_STRATEGIES, "rag", "mac", "mac+rag"))
    raise ValueError(f"unknown strategy {name!r}; choose from {known}")


def _unscored() -> dict[str, float]:
    return {"em": float("nan"), "f1": float("nan"), "recall": float("nan"), "n": 0}


def _score(
    method: BaseMethod, qas: Sequence[QA], contexts: Sequence[str] | None = None
) -> dict[str, float]:
    if not qas:
        return _unscored()
    preds = method.answer([q.question for q in qas], contexts)
    return score(preds, [q.answers for q in qas])


def _by_document(
    method: BaseMethod, docs: Sequence[Document]
) -> tuple[dict[str, float], list[dict[str, float] | None]]:
    """Scores on every question of the documents, and on each document's own (None for a
    document without questions), from one round of answers."""
    qas = all_questions(docs)
    if not qas:
        return _unscored(), [None] * len(docs)
    preds = method.answer([q.question for q in qas])
    out: list[dict[str, float] | None] = []
    k = 0
    for d in docs:
        n = len(d.questions)
        out.append(score(preds[k : k + n], [q.answers for q in d.questions]) if n else None)
        k += n
    return score(preds, [q.answers for q in qas]), out


def _mean(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Scores averaged over documents (each document counts once, whatever its questions)."""
    if not scores:
        return _unscored()
    out = {k: statistics.fmean(s[k] for s in scores) for k in ("em", "f1", "recall")}
    return out | {"n": sum(s["n"] for s in scores)}


@dataclass(frozen=True)
class Held:
    """What learning must not break: closed-book retention questions the base already answers,
    and held-out passages' questions each asked with its own passage in context (does the model
    still read?)."""

    retention: list[QA] = field(default_factory=list)
    reading: list[QA] = field(default_factory=list)
    reading_contexts: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, retention: Path | None, reading: Path | None) -> Held:
        passages = read_documents(reading) if reading else []
        return cls(
            retention=all_questions(read_documents(retention)) if retention else [],
            reading=all_questions(passages),
            reading_contexts=[d.text for d in passages for _ in d.questions],
        )

    def score(self, method: BaseMethod) -> tuple[dict[str, float], dict[str, float]]:
        """Retention and reading scores."""
        return _score(method, self.retention), _score(method, self.reading, self.reading_contexts)


@dataclass(frozen=True)
class Baseline:
    """The base's scores that a run on `docs` is measured against."""

    docs: list[Document]
    held: Held
    stream: dict[str, float]  # every question of the documents
    per_doc: list[dict[str, float] | None]  # each document's own questions
    retention: dict[str, float]
    reading: dict[str, float]

    @classmethod
    def measure(cls, base: BaseMethod, docs: list[Document], held: Held) -> Baseline:
        retention, reading = held.score(base)
        stream, per_doc = _by_document(base, docs)
        return cls(docs, held, stream, per_doc, retention, reading)

    def on(self, base: BaseMethod, docs: list[Document]) -> Baseline:
        """The same held-out scores, for other documents (a sweep's validation stream)."""
        stream, per_doc = _by_document(base, docs)
        return replace(self, docs=docs, stream=stream, per_doc=per_doc)

    def before(self, protocol: EvalProtocol) -> dict[str, float]:
        if protocol == "stream":
            return self.stream
        return _mean([s for s in self.per_doc if s is not None])


@dataclass
class RunResult:
    strategy: str
    seed: int
    lr: float | None
    steps: int | None
    before: dict[str, float]
    after: dict[str, float]
    retention_before: dict[str, float]
    retention_after: dict[str, float]
    reading_before: dict[str, float]
    reading_after: dict[str, float]
    seconds_per_doc: float
    answer_seconds_per_question: float
    curve: list[tuple[int, float]]
    n_docs: int = 0
    memory_bytes: int = 0
    matrix: list[list[float | None]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def uptake_f1(self) -> float:
        return self.after["f1"] - self.before["f1"]

    @property
    def uptake_recall(self) -> float:
        return self.after["recall"] - self.before["recall"]

    @property
    def retention(self) -> float:
        return _kept(self.retention_before, self.retention_after)

    @property
    def reading(self) -> float:
        return _kept(self.reading_before, self.reading_after)


def _kept(before: dict[str, float], after: dict[str, float]) -> float:
    return after["f1"] / before["f1"] if before["f1"] > 0 else float("nan")


@dataclass(frozen=True)
class Run:
    """One strategy's run: what it is called and trained with, and how much it reports."""

    name: str
    seed: int
    lr: float | None
    steps: int | None
    checkpoints: int = 0
    matrix: bool = False
    progress: bool = True


def _marks(n: int, checkpoints: int) -> set[int]:
    marks = {round(n * (i + 1) / checkpoints) for i in range(checkpoints)} if checkpoints else set()
    return marks | {n}


def run_method(method: BaseMethod, base: Baseline, cfg: EvalConfig, run: Run) -> RunResult:
    """The method through the configured protocol on the baseline's documents."""
    trust = SourceTrust(cfg.trust)
    if cfg.protocol == "single":
        return _single(method, base, trust, run)
    return _stream(method, base, trust, run, cfg.learning.learn_batch)


def _stream(
    method: BaseMethod, base: Baseline, trust: SourceTrust, run: Run, batch: int = 1
) -> RunResult:
    """Feed the documents once, in order, `batch` at a time (learned together as the worker
    learns queued documents), scoring all their questions at a few points along the way. With
    `run.matrix`, after every document j it also scores each earlier document i's questions:
    the lower-triangular stream-retention matrix R[i][j] (a micro-batch's documents share the
    scores taken after it)."""
    docs = base.docs
    qas = all_questions(docs)
    grid: list[list[float | None]] = [[None] * len(docs) for _ in docs] if run.matrix else []
    marks = _marks(len(docs), run.checkpoints)
    curve = [(0, base.stream["f1"])]
    ingest_s = answer_s = 0.0
    after = base.stream
    bar = tqdm(
        total=len(docs), desc=f"{run.name} lr={run.lr}", unit="doc", disable=not run.progress
    )
    for start in range(0, len(docs), batch):
        group = docs[start : start + batch]
        n = start + len(group)
        t = time.perf_counter()
        items = [(doc, trust.update_scale(doc.source)) for doc in group]
        if batch > 1:
            method.ingest_together(items)
        else:
            method.ingest(*items[0])
        ingest_s += time.perf_counter() - t
        bar.update(len(group))
        if run.matrix:
            for i, scored in enumerate(_by_document(method, docs[:n])[1]):
                for j in range(max(i, start), n):
                    grid[i][j] = None if scored is None else scored["f1"]
        if marks & set(range(start + 1, n + 1)):
            t = time.perf_counter()
            after = _score(method, qas)
            answer_s = (time.perf_counter() - t) / max(1, len(qas))
            curve.append((n, after["f1"]))
    bar.close()
    return _result(method, base, run, base.stream, after, curve, (ingest_s, answer_s), grid)


def _single(method: BaseMethod, base: Baseline, trust: SourceTrust, run: Run) -> RunResult:
    """SEAL's protocol: each document learned alone from a fresh start and asked its own
    questions; the curve is the running mean over the documents learned so far. Retention and
    reading are measured after the last document, before its reset."""
    marks = _marks(len(base.docs), run.checkpoints)
    before = base.before("single")
    curve = [(0, before["f1"])]
    afters: list[dict[str, float]] = []
    ingest_s = answer_s = 0.0
    desc = f"{run.name} lr={run.lr} (single)"
    pairs = list(zip(base.docs, base.per_doc, strict=True))
    for n, (doc, doc_before) in enumerate(
        tqdm(pairs, desc=desc, unit="doc", disable=not run.progress), 1
    ):
        method.reset()
        t = time.perf_counter()
        method.ingest(doc, trust.update_scale(doc.source))
        ingest_s += time.perf_counter() - t
        if doc_before is not None:
            t = time.perf_counter()
            afters.append(_score(method, doc.questions))
            answer_s += time.perf_counter() - t
        if n in marks:
            curve.append((n, _mean(afters)["f1"]))
    asked = max(1, sum(len(d.questions) for d in base.docs))
    return _result(
        method, base, run, before, _mean(afters), curve, (ingest_s, answer_s / asked), []
    )


def _result(
    method: BaseMethod,
    base: Baseline,
    run: Run,
    before: dict[str, float],
    after: dict[str, float],
    curve: list[tuple[int, float]],
    seconds: tuple[float, float],
    grid: list[list[float | None]],
) -> RunResult:
    """`seconds`: all ingesting, and answering per question of the documents (the last
    scoring, or every document's under `single`)."""
    ingest_s, answer_s = seconds
    retention, reading = base.held.score(method)
    return RunResult(
        strategy=run.name,
        seed=run.seed,
        lr=run.lr,
        steps=run.steps,
        before=before,
        after=after,
        retention_before=base.retention,
        retention_after=retention,
        reading_before=base.reading,
        reading_after=reading,
        seconds_per_doc=ingest_s / max(1, len(base.docs)),
        answer_seconds_per_question=answer_s,
        curve=curve,
        n_docs=len(base.docs),
        memory_bytes=method.memory_bytes(),
        matrix=grid,
        summary=method.summary(),
    )


def matrix_summary(grid: list[list[float | None]]) -> dict[str, float]:
    """Backward transfer (mean change on a document's questions from right after it was read to
    the end of the stream) and the end-of-stream F1 as a share of the right-after F1."""
    last = len(grid) - 1
    pairs = [
        (row[i], row[last])
        for i, row in enumerate(grid[:last])
        if row[i] is not None and row[last] is not None
    ]
    if not pairs:
        return {"backward_transfer": float("nan"), "kept_share": float("nan")}
    right_after = statistics.fmean(a for a, _ in pairs)
    at_end = statistics.fmean(b for _, b in pairs)
    return {
        "backward_transfer": at_end - right_after,
        "right_after_f1": right_after,
        "end_f1": at_end,
        "kept_share": at_end / right_after if right_after > 0 else float("nan"),
    }


def plot_retention_matrices(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in report["strategies"] if r.get("matrix")]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        grid = np.array([[np.nan if v is None else v for v in row] for row in r["matrix"]])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        bwt = r["matrix_summary"]["backward_transfer"]
        ax.set_title(f"{r['strategy']} (BWT {bwt:+.3f})")
        ax.set_xlabel("after document j")
        ax.set_ylabel("questions of document i")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="F1")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_retention_file(data: Path) -> Path | None:
    candidate = data.parent / "retention_qa.jsonl"
    return candidate if candidate.exists() else None


def _describe(r: RunResult) -> str:
    return (
        f"uptake F1 {r.uptake_f1:+.3f}, recall {r.uptake_recall:+.3f}, "
        f"retention {r.retention:.3f}, reading {r.reading:.3f}"
    )


def run_eval(
    data: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: EvalConfig,
    retention: str | os.PathLike[str] | None = None,
    val_data: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
    reading: str | os.PathLike[str] | None = None,
) -> dict:
    """The whole `uptake eval`: optional lr sweep on a validation stream, then every strategy
    through the protocol for every seed; writes report.json, report.md and uptake.png."""
    if cfg.protocol == "single" and cfg.retention_matrix:
        raise ValueError(
            "the retention matrix scores earlier documents under one adapter: it needs the "
            "stream protocol"
        )
    if cfg.protocol == "single" and cfg.learning.learn_batch > 1:
        raise ValueError(
            "learning documents several at a time needs the stream protocol: the single one "
            "learns each alone from a fresh adapter"
        )
    data_p = Path(data)
    docs = read_documents(data_p, cfg.limit)
    if not all_questions(docs):
        raise ValueError(f"{data_p} has no questions to score: uptake needs QA about the stream")
    ret_p = Path(retention) if retention else default_retention_file(data_p)
    held = Held.read(ret_p, Path(reading) if reading else None)
    corpus = [d.text for d in docs]
    model_dir = str(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bare = BaseMethod(model_dir, cfg)
    base = Baseline.measure(bare, docs, held)
    before = base.before(cfg.protocol)
    log(
        f"base ({cfg.protocol}): F1 {before['f1']:.3f}, recall {before['recall']:.3f}, "
        f"retention F1 {base.retention['f1']:.3f}, reading F1 {base.reading['f1']:.3f}"
    )

    sweep: dict[str, list[dict]] = {}
    if cfg.sweep_lrs:
        if not val_data:
            raise ValueError("an lr sweep needs a validation stream (--val FILE)")
        val = base.on(bare, read_documents(val_data, cfg.limit))
        for name in cfg.strategies:
            if name not in UPDATE_STRATEGIES:
                continue
            rows = []
            for lr in cfg.sweep_lrs:
                for steps in cfg.sweep_steps or (cfg.steps_per_doc,):
                    trial = replace(cfg, steps_per_doc=steps)
                    method = make_method(name, model_dir, trial, lr, cfg.seeds[0], corpus)
                    r = run_method(method, val, trial, Run(name, cfg.seeds[0], lr, steps))
                    rows.append(
                        {
                            "lr": lr,
                            "steps": steps,
                            "uptake_f1": r.uptake_f1,
                            "uptake_recall": r.uptake_recall,
                            "retention": r.retention,
                        }
                    )
                    log(f"sweep {name} lr={lr:g} steps={steps}: {_describe(r)}")
            sweep[name] = rows
            best = choose_setting(rows, cfg.retention_floor)
            cfg.tuned[name] = (best["lr"], best["steps"])
    del bare

    results: list[RunResult] = []
    for name in cfg.strategies:
        for seed in cfg.seeds if name in UPDATE_STRATEGIES else cfg.seeds[:1]:
            lr, steps = cfg.tuned.get(name, (cfg.lr, cfg.steps_per_doc))
            run_cfg = replace(cfg, steps_per_doc=steps)
            method = make_method(name, model_dir, run_cfg, lr, seed, corpus)
            gradient = name in UPDATE_STRATEGIES
            run = Run(
                name,
                seed,
                lr if gradient else None,
                steps if gradient else None,
                checkpoints=cfg.checkpoints,
                matrix=cfg.retention_matrix and seed == cfg.seeds[0],
            )
            r = run_method(method, base, run_cfg, run)
            results.append(r)
            log(f"{name} seed={seed}: {_describe(r)}, {r.seconds_per_doc * 1000:.0f} ms/doc")
            del method
            # Every finished run is written at once, so a run stopped later still leaves its rows.
            report = build_report(results, base, cfg, data_p, model_dir, sweep)
            write_report(report, out)
    return report


def choose_setting(rows: list[dict], floor: float) -> dict:
    """Best uptake among the settings that keep retention above the floor (or the safest if none
    do)."""
    ok = [r for r in rows if r["retention"] >= floor]
    if ok:
        return max(ok, key=lambda r: r["uptake_f1"])
    return max(rows, key=lambda r: r["retention"])


def _mean_spread(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "std": float("nan")}
    return {
        "mean": statistics.fmean(clean),
        "min": min(clean),
        "max": max(clean),
        "std": statistics.pstdev(clean) if len(clean) > 1 else 0.0,
    }


def build_report(
    results: list[RunResult],
    base: Baseline,
    cfg: EvalConfig,
    data: Path,
    model_dir: str,
    sweep: dict,
) -> dict:
    before = base.before(cfg.protocol)
    rows = []
    for name in dict.fromkeys(r.strategy for r in results):
        rs = [r for r in results if r.strategy == name]
        rows.append(
            {
                "strategy": name,
                "lr": rs[0].lr,
                "steps": rs[0].steps,
                "seeds": [r.seed for r in rs],
                "f1_before": before["f1"],
                "recall_before": before["recall"],
                "em_before": before["em"],
                "f1_after": _mean_spread([r.after["f1"] for r in rs]),
                "recall_after": _mean_spread([r.after["recall"] for r in rs]),
                "em_after": _mean_spread([r.after["em"] for r in rs]),
                "uptake_f1": _mean_spread([r.uptake_f1 for r in rs]),
                "uptake_recall": _mean_spread([r.uptake_recall for r in rs]),
                "retention": _mean_spread([r.retention for r in rs]),
                "reading": _mean_spread([r.reading for r in rs]),
                "seconds_per_doc": statistics.fmean(r.seconds_per_doc for r in rs),
                "answer_ms": 1000 * statistics.fmean(r.answer_seconds_per_question for r in rs),
                "memory_bytes": rs[0].memory_bytes,
                "bytes_per_doc": rs[0].memory_bytes / max(1, rs[0].n_docs),
                "curve": rs[0].curve,
            }
        )
        if rs[0].matrix:
            rows[-1]["matrix"] = rs[0].matrix
            rows[-1]["matrix_summary"] = matrix_summary(rs[0].matrix)
        if rs[0].summary:
            rows[-1]["summary"] = {
                k: _mean_spread([r.summary[k] for r in rs]) for k in rs[0].summary
            }
    return {
        "data": str(data),
        "model": model_dir,
        "protocol": cfg.protocol,
        "config": asdict(cfg),
        "documents": len(base.docs),
        "questions": int(base.stream["n"]),
        "retention_questions": int(base.retention["n"]),
        "reading_questions": int(base.reading["n"]),
        "base": {"stream": before, "retention": base.retention, "reading": base.reading},
        "strategies": rows,
        "sweep": sweep,
        "runs": [
            asdict(r)
            | {
                "uptake_f1": r.uptake_f1,
                "uptake_recall": r.uptake_recall,
                "retention": r.retention,
                "reading": r.reading,
            }
            for r in results
        ],
    }


def _pm(stat: dict[str, float]) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    if stat["std"] and not math.isnan(stat["std"]):
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return f"{stat['mean']:.3f}"


def _trained_part(cfg: dict) -> str:
    if cfg.get("full_finetune"):
        return "gradient strategies train every weight of the base (full fine-tuning)"
    lora = cfg["lora"]
    return f"gradient strategies train a rank-{lora['rank']} LoRA adapter (alpha {lora['alpha']})"


def _protocol_text(report: dict) -> str:
    cfg = report["config"]
    learning = cfg["learning"]
    epochs = learning["epochs"]
    passes = f"{epochs} pass{'es' if epochs != 1 else ''} over its training sequences"
    if report["protocol"] == "single":
        return (
            f"Protocol single (SEAL's): each of the {report['documents']} documents is learned "
            f"alone from a fresh adapter ({passes}) and asked its own questions closed-book, "
            "then the adapter is reset. Before, after and uptake are means over the documents "
            "with questions; the curve is the running mean over the documents learned so far. "
            "Retention and reading are measured after the last document's adapter, before its "
            "reset."
        )
    batch = learning.get("learn_batch", 1)
    together = (
        f" Documents are learned {batch} at a time, as the worker's UPTAKE_LEARN_BATCH: those of "
        "one chunk and one trust share one step on a padded micro-batch."
        if batch > 1
        else ""
    )
    return (
        f"Protocol stream: one adapter (or store) reads the {report['documents']} documents "
        f"once, in order ({passes} each), and is asked all their questions closed-book at the "
        "end." + together + _rehearsal_text(learning)
    )


def _rehearsal_text(learning: dict) -> str:
    """Rehearsal in the stream protocol (in the single one there is nothing earlier to rehearse)."""
    if not learning.get("rehearse"):
        return ""
    return (
        f" Rehearsal: every pass over a document is followed by one over {learning['rehearse']} "
        f"earlier documents, drawn from the last {learning['rehearsal_window']} learned."
    )


def report_markdown(report: dict) -> str:
    cfg = report["config"]
    reading = (
        f"reading = F1 on {report['reading_questions']} held-out questions asked with their own "
        "passage in context, after / before"
        if report["reading_questions"]
        else "reading: no held-out passages given (–)"
    )
    lines = [
        f"# uptake eval: {Path(report['data']).name}",
        "",
        f"Model `{report['model']}`; {_trained_part(cfg)}; "
        f"{report['questions']} stream questions, "
        f"{report['retention_questions']} retention questions. {_protocol_text(report)} "
        "Uptake = after − before, in F1 and in recall (the share of the gold answer's tokens "
        f"in the first sentence of an answer capped at {cfg['max_new_tokens']} new tokens); "
        f"retention = closed-book retention F1 after / before; {reading}. ± is the standard "
        "deviation over seeds. State bytes / doc is what the method keeps beyond the base, "
        "over the number of documents (for LoRA a fixed-size adapter, so it shrinks as the "
        "stream grows).",
        "",
        "| strategy | lr × steps | F1 before | F1 after | uptake F1 | recall before | "
        "recall after | uptake recall | EM before | EM after | retention | reading | ms / doc | "
        "answer ms / q | state bytes / doc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for r in report["strategies"]:
        lr = f"{r['lr']:g} × {r['steps']}" if r["lr"] else "–"
        lines.append(
            f"| {r['strategy']} | {lr} | {r['f1_before']:.3f} | {_pm(r['f1_after'])} | "
            f"{_pm(r['uptake_f1'])} | {r['recall_before']:.3f} | {_pm(r['recall_after'])} | "
            f"{_pm(r['uptake_recall'])} | {r['em_before']:.3f} | {_pm(r['em_after'])} | "
            f"{_pm(r['retention'])} | {_pm(r['reading'])} | {1000 * r['seconds_per_doc']:.1f} | "
            f"{r['answer_ms']:.1f} | {r['bytes_per_doc']:,.0f} |"
        )
    with_matrix = [r for r in report["strategies"] if r.get("matrix")]
    if with_matrix:
        lines += [
            "",
            "## Stream retention (document i's questions after document j)",
            "",
            "| strategy | F1 right after reading | F1 at end of stream | backward transfer | kept |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in with_matrix:
            m = r["matrix_summary"]
            lines.append(
                f"| {r['strategy']} | {m['right_after_f1']:.3f} | {m['end_f1']:.3f} | "
                f"{m['backward_transfer']:+.3f} | {m['kept_share']:.2f} |"
            )
        lines += ["", "![retention matrices](retention_matrix.png)"]
    with_summary = [r for r in report["strategies"] if r.get("summary")]
    if with_summary:
        lines += [
            "",
            "## Best-of-k self-edits: do probe questions pick what the gold questions would?",
            "",
            "Each candidate self-edit is trained from the same state and scored by the mean "
            "answer NLL of probe questions and of the document's gold questions; the probes "
            "choose. Correlations pool every candidate of every document.",
            "",
            "| strategy | candidates | Pearson (NLL) | Spearman (NLL) | chose the gold-best | "
            "chance |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in with_summary:
            m = r["summary"]
            lines.append(
                f"| {r['strategy']} | {m['candidates']['mean']:.0f} | "
                f"{_pm(m['probe_gold_pearson'])} | {_pm(m['probe_gold_spearman'])} | "
                f"{_pm(m['chose_gold_best'])} | {m['chance']['mean']:.2f} |"
            )
    if report["sweep"]:
        lines += [
            "",
            "## Learning-rate sweep (validation stream)",
            "",
            "| strategy | lr | steps / doc | uptake F1 | uptake recall | retention |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, rows in report["sweep"].items():
            lines += [
                f"| {name} | {r['lr']:g} | {r['steps']} | {r['uptake_f1']:+.3f} | "
                f"{r['uptake_recall']:+.3f} | {r['retention']:.3f} |"
                for r in rows
            ]
    lines += ["", "![uptake](uptake.png)", ""]
    return "\n".join(lines)


def plot_uptake(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["strategies"]:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, marker="o", label=r["strategy"])
    ax.set_xlabel("documents seen")
    ax.set_ylabel(
        "mean F1 on each document's own questions"
        if report["protocol"] == "single"
        else "F1 on stream questions"
    )
    ax.set_title(f"Uptake on {Path(report['data']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(report_markdown(report))
    plot_uptake(report, out / "uptake.png")
    if any(r.get("matrix") for r in report["strategies"]):
        plot_retention_matrices(report, out / "retention_matrix.png")
