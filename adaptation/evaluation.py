"""Stream evaluation: every method starts from the same base, reads the same stream once, and is
scored closed-book on the stream's questions and on retention questions it knew before.

Uptake is F1 after the stream minus F1 before it; retention is F1 on the retention questions after
over before. Both are always reported together, because either one alone is easy to game.
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
from typing import Protocol

import torch
from tqdm.auto import tqdm

from adaptation.answering import generate_answers
from adaptation.best_of_k import BestOfK, best_of_k, correlation, generate_probes
from adaptation.data import QA, Document, all_questions, read_documents
from adaptation.metrics import score
from adaptation.modeling import DEFAULT_TARGET_MODULES, LoraSettings, attach_lora, load_base
from adaptation.retrieval import Retriever, as_context
from adaptation.trust import SourceTrust, apply_trusted, tag_text
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting import Weighter, encode_weighted, make_weighter

UPDATE_STRATEGIES = ("uniform", "salient", "tfidf", "camels", "seal", "seal-best")


class Method(Protocol):
    """A way of folding documents into a model and answering from it."""

    name: str

    def ingest(self, doc: Document) -> None: ...

    def answer(self, questions: Sequence[str]) -> list[str]: ...

    def memory_bytes(self) -> int: ...

    def summary(self) -> dict[str, float]:
        """Method-specific figures for the report (e.g. best-of-k's probe/gold correlation)."""
        ...


@dataclass
class EvalConfig:
    strategies: tuple[str, ...] = ("uniform", "salient", "tfidf", "rag")
    lr: float = 1e-3
    steps_per_doc: int = 1
    normalisation: str = "tokens"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_TARGET_MODULES
    full_finetune: bool = False
    seeds: tuple[int, ...] = (0,)
    limit: int | None = None
    checkpoints: int = 5
    max_new_tokens: int = 12
    rag_k: int = 3
    weighter_path: str | None = None
    mac_path: str | None = None
    sweep_lrs: tuple[float, ...] = ()
    retention_floor: float = 0.9
    retention_matrix: bool = False
    device: str | None = None
    sweep_steps: tuple[int, ...] = ()
    tuned: dict[str, tuple[float, int]] = field(default_factory=dict)
    trust: dict[str, float] = field(default_factory=dict)
    tag_salt: str | None = None
    best_of_k: int = 3


class LoraMethod:
    """Online LoRA fine-tuning with a token weighting: the `lora` mode of the service.

    With `full_finetune` every weight of the base is trained instead, the baseline that says
    whether the adapter's smaller footprint costs uptake or saves retention.
    """

    def __init__(
        self, model_dir: str, weighter: Weighter, cfg: EvalConfig, lr: float, seed: int
    ) -> None:
        torch.manual_seed(seed)
        base, self.tokenizer = load_base(model_dir, device=cfg.device)
        if cfg.full_finetune:
            self.model = base.requires_grad_(True)
        else:
            lora = LoraSettings(
                rank=cfg.lora_rank, alpha=2 * cfg.lora_rank, target_modules=cfg.lora_targets
            )
            self.model = attach_lora(base, lora)
        self.weighter = weighter
        self.name = weighter.name
        self.updater = OnlineUpdater(
            self.model,
            UpdateConfig(lr=lr, steps_per_doc=cfg.steps_per_doc, normalisation=cfg.normalisation),  # type: ignore[arg-type]
        )
        self.max_new_tokens = cfg.max_new_tokens
        self.trust = SourceTrust(cfg.trust)
        self.tag_salt = cfg.tag_salt

    def training_text(self, text: str, source: str | None) -> str:
        """Text as trained on: prefixed with its source's tag when the run tags sources (IML)."""
        return text if self.tag_salt is None else tag_text(text, source, self.tag_salt)

    def ingest(self, doc: Document) -> None:
        text = self.training_text(doc.text, doc.source)
        weighted = encode_weighted(text, self.tokenizer, self.weighter)
        apply_trusted(self.updater, [weighted], self.trust.update_scale(doc.source))

    def memory_bytes(self) -> int:
        """A fixed-size adapter (or the whole base): it does not grow with the stream."""
        return sum(p.numel() * p.element_size() for p in self.updater.params)

    def summary(self) -> dict[str, float]:
        return {}

    def answer(self, questions: Sequence[str]) -> list[str]:
        return generate_answers(
            self.model, self.tokenizer, questions, max_new_tokens=self.max_new_tokens
        )


class SealMethod(LoraMethod):
    """SEAL-style updates: train on the document's self-edits plus the document itself.

    Self-edits come with the document (e.g. the Qwen rewrites in shared/data) or, for knowledge-
    world documents, from the template paraphraser standing in for a capable model. Its QA lines
    are left out, since they would reuse the world's own question phrasings.

    With `best_of_k` > 1 (the `seal-best` strategy), each self-edit is a candidate: every one is trained from the same state,
    scored on probe questions, and the best kept (`adaptation.best_of_k`). Each candidate is also
    scored on the document's gold questions, so the report can say how well probes stand in.
    """

    def __init__(
        self, model_dir: str, cfg: EvalConfig, lr: float, seed: int, best_of_k: int = 0
    ) -> None:
        super().__init__(model_dir, make_weighter("uniform"), cfg, lr, seed)
        self.name = "seal" if best_of_k < 2 else "seal-best"
        self.best_of_k = best_of_k
        self.choices: list[BestOfK] = []

    def generations(self, doc: Document, k: int) -> list[str]:
        """The document's supplied self-edits, or k from the paraphraser for a world article."""
        from adaptation.paraphrase import paraphrase

        if doc.self_edits:
            return list(doc.self_edits)
        return paraphrase(doc, k=k, qa=False) if doc.meta.get("entity") else []

    def ingest(self, doc: Document) -> None:
        from adaptation.self_edit import apply_with_self_edits, document_sequences

        trust = self.trust.update_scale(doc.source)
        gens = self.generations(doc, max(2, self.best_of_k))
        if self.best_of_k < 2 or len(gens) < 2 or not doc.questions:
            sequences = self._tagged(document_sequences(doc, gens), doc.source)
            apply_with_self_edits(
                self.updater, self.tokenizer, self.weighter, sequences, trust=trust
            )
            return
        candidates = [
            self._tagged(document_sequences(doc, [g]), doc.source) for g in gens[: self.best_of_k]
        ]
        self.choices.append(
            best_of_k(
                self.updater,
                self.tokenizer,
                self.weighter,
                candidates,
                self.probes(doc),
                gold=doc.questions,
                scoring="nll",
                trust=trust,
                max_new_tokens=self.max_new_tokens,
            )
        )

    def _tagged(self, sequences: list[str], source: str | None) -> list[str]:
        return [self.training_text(s, source) for s in sequences]

    def probes(self, doc: Document) -> list[QA]:
        """Probe questions for best-of-k: the paraphraser's self-QA for a world article, asked
        in other phrasings than the gold questions where the templates allow; otherwise the
        model's own self-QA."""
        from adaptation.paraphrase import paraphrase
        from adaptation.self_edit import parse_qa_pairs

        if doc.meta.get("entity"):
            gold = {q.question for q in doc.questions}
            pairs = [p for g in paraphrase(doc, k=1, seed=1, qa=True) for p in parse_qa_pairs(g)]
            fresh = [p for p in pairs if p.question not in gold]
            if fresh or pairs:
                return fresh or pairs
        return generate_probes(
            self.model, self.tokenizer, doc.title, doc.text, max_new_tokens=128
        ) or list(doc.questions[:1])

    def summary(self) -> dict[str, float]:
        """How well probe scores track gold scores across the candidates, and how often the
        probes picked the candidate that was best on the gold questions."""
        if not self.choices:
            return {}
        probe = [s.nll for c in self.choices for s in c.probe]
        gold = [s.nll for c in self.choices if c.gold for s in c.gold]
        corr = correlation(probe, gold)
        hits = [
            c.chosen == min(range(len(c.gold)), key=lambda i: c.gold[i].nll)
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


class BaseMethod:
    """The unadapted base: the 'before' of every comparison."""

    name = "base"

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        self.model, self.tokenizer = load_base(model_dir, device=cfg.device)
        self.max_new_tokens = cfg.max_new_tokens

    def ingest(self, doc: Document) -> None:
        return None

    def memory_bytes(self) -> int:
        """What the method keeps to answer from, beyond the base model."""
        return 0

    def summary(self) -> dict[str, float]:
        return {}

    def answer(self, questions: Sequence[str]) -> list[str]:
        return generate_answers(
            self.model, self.tokenizer, questions, max_new_tokens=self.max_new_tokens
        )


class RagMethod(BaseMethod):
    """Retrieval over the stored documents with the unchanged base: the strong, cheap baseline."""

    name = "rag"

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        super().__init__(model_dir, cfg)
        self.retriever = Retriever()
        self.k = cfg.rag_k

    def ingest(self, doc: Document) -> None:
        self.retriever.add(doc.id, doc.text)

    def memory_bytes(self) -> int:
        return self.retriever.nbytes

    def answer(self, questions: Sequence[str]) -> list[str]:
        contexts = [as_context(self.retriever.search(q, self.k)) for q in questions]
        return generate_answers(
            self.model,
            self.tokenizer,
            questions,
            contexts=contexts,
            max_new_tokens=self.max_new_tokens,
        )


class MacMethod(BaseMethod):
    """MAC: each document becomes one modulation in a memory bank; no gradient at ingest."""

    name = "mac"

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        from adaptation.mac.bank import MemoryBank
        from adaptation.mac.system import MacSystem

        super().__init__(model_dir, cfg)
        self.system = MacSystem.load(str(cfg.mac_path), self.model, self.tokenizer)
        self.system.bank = MemoryBank(self.system.bank.num_tokens, self.system.bank.width)

    def ingest(self, doc: Document) -> None:
        self.system.ingest(doc.id, doc.text)

    def answer(self, questions: Sequence[str]) -> list[str]:
        return self.system.answer(questions, max_new_tokens=self.max_new_tokens)

    def memory_bytes(self) -> int:
        return self.system.bank.nbytes


class MacRagMethod(MacMethod):
    """MAC over only the retrieved documents' modulations, with their text in context."""

    name = "mac+rag"

    def __init__(self, model_dir: str, cfg: EvalConfig) -> None:
        super().__init__(model_dir, cfg)
        self.retriever = Retriever()
        self.k = cfg.rag_k

    def ingest(self, doc: Document) -> None:
        super().ingest(doc)
        self.retriever.add(doc.id, doc.text)

    def answer(self, questions: Sequence[str]) -> list[str]:
        hits = [self.retriever.search(q, self.k) for q in questions]
        return self.system.answer(
            questions,
            contexts=[as_context(h) for h in hits],
            doc_ids=[[doc_id for doc_id, _, _ in h] for h in hits],
            max_new_tokens=self.max_new_tokens,
        )

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.retriever.nbytes


def make_method(
    name: str, model_dir: str, cfg: EvalConfig, lr: float, seed: int, corpus: list[str]
) -> Method:
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


def _score(method: Method, qas: Sequence[QA]) -> dict[str, float]:
    if not qas:
        return {"em": float("nan"), "f1": float("nan"), "n": 0}
    preds = method.answer([q.question for q in qas])
    return score(preds, [q.answers for q in qas])


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
    def retention(self) -> float:
        b = self.retention_before["f1"]
        return self.retention_after["f1"] / b if b > 0 else float("nan")


def stream_once(
    method: Method,
    docs: Sequence[Document],
    retention_qas: Sequence[QA],
    before: dict[str, float],
    retention_before: dict[str, float],
    checkpoints: int,
    seed: int,
    lr: float | None,
    progress: bool = True,
    matrix: bool = False,
    steps: int | None = None,
) -> RunResult:
    """Feed the stream once, scoring all stream questions at a few points along the way.

    With `matrix`, after every document j it also scores each earlier document i's questions:
    the lower-triangular stream-retention matrix R[i][j].
    """
    qas = all_questions(docs)
    grid: list[list[float | None]] = [[None] * len(docs) for _ in docs] if matrix else []
    marks = (
        {round(len(docs) * (i + 1) / checkpoints) for i in range(checkpoints)}
        if checkpoints
        else set()
    )
    marks.add(len(docs))
    curve = [(0, before["f1"])]
    ingest_s = 0.0
    after = before
    for n, doc in enumerate(
        tqdm(docs, desc=f"{method.name} lr={lr}", unit="doc", disable=not progress), 1
    ):
        t = time.perf_counter()
        method.ingest(doc)
        ingest_s += time.perf_counter() - t
        if matrix:
            for i, f1 in enumerate(_per_document_f1(method, docs[:n])):
                grid[i][n - 1] = f1
        if n in marks:
            after = _score(method, qas)
            curve.append((n, after["f1"]))
    t = time.perf_counter()
    retention_after = _score(method, retention_qas)
    answer_s = (time.perf_counter() - t) / max(1, len(retention_qas))
    return RunResult(
        strategy=method.name,
        seed=seed,
        lr=lr,
        steps=steps,
        before=before,
        after=after,
        retention_before=retention_before,
        retention_after=retention_after,
        seconds_per_doc=ingest_s / max(1, len(docs)),
        answer_seconds_per_question=answer_s,
        curve=curve,
        n_docs=len(docs),
        memory_bytes=method.memory_bytes(),
        matrix=grid,
        summary=method.summary(),
    )


def _per_document_f1(method: Method, docs: Sequence[Document]) -> list[float | None]:
    """Mean F1 over each document's own questions (None for a document without questions)."""
    qas = all_questions(docs)
    preds = method.answer([q.question for q in qas]) if qas else []
    out: list[float | None] = []
    k = 0
    for d in docs:
        n = len(d.questions)
        out.append(score(preds[k : k + n], [q.answers for q in d.questions])["f1"] if n else None)
        k += n
    return out


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


def run_eval(
    data: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: EvalConfig,
    retention: str | os.PathLike[str] | None = None,
    val_data: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole `uptake eval`: optional lr sweep on a validation stream, then every strategy on
    the stream for every seed; writes report.json, report.md and uptake.png."""
    data_p = Path(data)
    docs = read_documents(data_p, cfg.limit)
    if not all_questions(docs):
        raise ValueError(f"{data_p} has no questions to score: uptake needs QA about the stream")
    ret_p = Path(retention) if retention else default_retention_file(data_p)
    retention_qas = all_questions(read_documents(ret_p)) if ret_p else []
    corpus = [d.text for d in docs]
    model_dir = str(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    base = BaseMethod(model_dir, cfg)
    before = _score(base, all_questions(docs))
    retention_before = _score(base, retention_qas)
    log(f"base: stream F1 {before['f1']:.3f}, retention F1 {retention_before['f1']:.3f}")

    sweep: dict[str, list[dict]] = {}
    if cfg.sweep_lrs:
        if not val_data:
            raise ValueError("an lr sweep needs a validation stream (--val FILE)")
        val_docs = read_documents(val_data, cfg.limit)
        val_before = _score(base, all_questions(val_docs))
        for name in cfg.strategies:
            if name not in UPDATE_STRATEGIES:
                continue
            rows = []
            for lr in cfg.sweep_lrs:
                for steps in cfg.sweep_steps or (cfg.steps_per_doc,):
                    trial = replace(cfg, steps_per_doc=steps)
                    method = make_method(name, model_dir, trial, lr, cfg.seeds[0], corpus)
                    r = stream_once(
                        method,
                        val_docs,
                        retention_qas,
                        val_before,
                        retention_before,
                        0,
                        cfg.seeds[0],
                        lr,
                    )
                    rows.append(
                        {
                            "lr": lr,
                            "steps": steps,
                            "uptake_f1": r.uptake_f1,
                            "retention": r.retention,
                        }
                    )
                    log(
                        f"sweep {name} lr={lr:g} steps={steps}: uptake {r.uptake_f1:+.3f} "
                        f"retention {r.retention:.3f}"
                    )
            sweep[name] = rows
            best = choose_setting(rows, cfg.retention_floor)
            cfg.tuned[name] = (best["lr"], best["steps"])
    del base

    results: list[RunResult] = []
    for name in cfg.strategies:
        for seed in cfg.seeds if name in UPDATE_STRATEGIES else cfg.seeds[:1]:
            lr, steps = cfg.tuned.get(name, (cfg.lr, cfg.steps_per_doc))
            run_cfg = replace(cfg, steps_per_doc=steps)
            method = make_method(name, model_dir, run_cfg, lr, seed, corpus)
            if name not in UPDATE_STRATEGIES:
                lr = steps = None
            r = stream_once(
                method,
                docs,
                retention_qas,
                before,
                retention_before,
                cfg.checkpoints,
                seed,
                lr,
                matrix=cfg.retention_matrix and seed == cfg.seeds[0],
                steps=steps,
            )
            results.append(r)
            log(
                f"{name} seed={seed}: uptake F1 {r.uptake_f1:+.3f}, retention {r.retention:.3f}, "
                f"{r.seconds_per_doc * 1000:.0f} ms/doc"
            )
            del method
    report = build_report(results, before, retention_before, cfg, data_p, model_dir, sweep)
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
    before: dict,
    retention_before: dict,
    cfg: EvalConfig,
    data: Path,
    model_dir: str,
    sweep: dict,
) -> dict:
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
                "em_before": before["em"],
                "f1_after": _mean_spread([r.after["f1"] for r in rs]),
                "em_after": _mean_spread([r.after["em"] for r in rs]),
                "uptake_f1": _mean_spread([r.uptake_f1 for r in rs]),
                "retention": _mean_spread([r.retention for r in rs]),
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
    cfg_json = asdict(cfg)
    return {
        "data": str(data),
        "model": model_dir,
        "config": cfg_json,
        "questions": int(before["n"]),
        "retention_questions": int(retention_before["n"]),
        "base": {"stream": before, "retention": retention_before},
        "strategies": rows,
        "sweep": sweep,
        "runs": [asdict(r) | {"uptake_f1": r.uptake_f1, "retention": r.retention} for r in results],
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
    return f"gradient strategies train a rank-{cfg['lora_rank']} LoRA adapter"


def report_markdown(report: dict) -> str:
    lines = [
        f"# uptake eval: {Path(report['data']).name}",
        "",
        f"Model `{report['model']}`; {_trained_part(report['config'])}; "
        f"{report['questions']} stream questions, "
        f"{report['retention_questions']} retention questions. Uptake = F1 after − F1 before; "
        "retention = retention F1 after / before. ± is the standard deviation over seeds. "
        "State bytes / doc is what the method keeps beyond the base, over the stream's length "
        "(for LoRA a fixed-size adapter, so it shrinks as the stream grows).",
        "",
        "| strategy | lr × steps | F1 before | F1 after | uptake F1 | EM before | EM after | retention "
        "| ms / doc | answer ms / q | state bytes / doc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["strategies"]:
        lr = f"{r['lr']:g} × {r['steps']}" if r["lr"] else "–"
        lines.append(
            f"| {r['strategy']} | {lr} | {r['f1_before']:.3f} | {_pm(r['f1_after'])} | "
            f"{_pm(r['uptake_f1'])} | {r['em_before']:.3f} | {_pm(r['em_after'])} | "
            f"{_pm(r['retention'])} | {1000 * r['seconds_per_doc']:.1f} | {r['answer_ms']:.1f} | "
            f"{r['bytes_per_doc']:,.0f} |"
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
            "| strategy | lr | steps / doc | uptake F1 | retention |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, rows in report["sweep"].items():
            lines += [
                f"| {name} | {r['lr']:g} | {r['steps']} | {r['uptake_f1']:+.3f} | {r['retention']:.3f} |"
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
    ax.set_ylabel("F1 on stream questions")
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
