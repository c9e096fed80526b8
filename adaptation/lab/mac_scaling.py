"""How MAC's answers scale with the memory: F1 and latency at banks of growing size.

Each size gets a fresh bank holding the target documents (whose questions are scored) and filler
up to that many entries, so the targets have to be picked out of an ever larger memory. Filler
is the data's own later documents first (SQuAD passages for a SQuAD stream, so the distractors
read like the targets on any base), then articles about other new people of the world. Latency is measured with the aggregator as trained (folding the memory
hierarchically once it exceeds its window) and with the hierarchy switched off (one attention
over every entry), which is what the folding buys. The trained system's own bank is restored
afterwards.

Answer time per question is a batch's wall time over its size, batches as `uptake eval` answers
them; batch-of-1 time is one question alone, the latency a lone caller sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adaptation.data import Document, all_questions, read_documents
from adaptation.lab.conflicts import fresh_world
from adaptation.lab.evaluation import EvalConfig
from adaptation.lab.world import WorldConfig
from adaptation.mac.bank import MemoryBank
from adaptation.mac.system import MacSystem
from adaptation.metrics import score
from adaptation.modeling import load_base

FILLER_PREFIX = "fill"


@dataclass(frozen=True)
class ScalingConfig:
    sizes: tuple[int, ...] = (10, 100, 1000, 5000)
    batch_size: int = 16  # MacSystem.answer's default, which `uptake eval` answers with
    max_new_tokens: int = EvalConfig.max_new_tokens
    rounds: int = 3  # timed passes over the questions: a p90 over more than a couple of batches
    single_questions: int = 4  # questions also answered alone, for the batch-of-1 latency
    ingest_batch: int = 16

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise ValueError(f"sizes must be positive entry counts, got {self.sizes}")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must increase, got {self.sizes}")
        for name in ("batch_size", "max_new_tokens", "rounds", "single_questions", "ingest_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def filler_documents(
    n: int, avoid: Collection[str] = (), world: WorldConfig | None = None, draw: int = 0
) -> list[Document]:
    """n articles about people drawn after the world's own splits, so a model trained on the
    world never saw them; people named in `avoid` (the targets') are skipped."""
    people = n + 2 * len(avoid)  # a person gives one article or two (a change): n always remain
    docs = fresh_world(world, draw).stream(people, FILLER_PREFIX)
    return [d for d in docs if d.title not in avoid][:n]


@contextmanager
def flat_aggregation(system: MacSystem) -> Iterator[None]:
    """Aggregate without the hierarchy: the window widened to the whole bank, so one attention
    reads every entry at once."""
    aggregator = system.networks.aggregator
    hierarchical = aggregator.config
    aggregator.config = dataclasses.replace(
        hierarchical, window=max(hierarchical.window, len(system.bank))
    )
    try:
        yield
    finally:
        aggregator.config = hierarchical


def _fill(system: MacSystem, docs: Sequence[Document], batch: int, desc: str) -> float:
    """Amortize the documents into the bank; the seconds spent amortizing."""
    seconds = 0.0
    with tqdm(total=len(docs), desc=desc, unit="doc") as bar:
        for start in range(0, len(docs), batch):
            chunk = [(d.id, d.text) for d in docs[start : start + batch]]
            t0 = time.perf_counter()
            system.ingest_many(chunk, batch_size=batch)
            seconds += time.perf_counter() - t0
            bar.update(len(chunk))
    return seconds


def _timed_answers(
    system: MacSystem, questions: Sequence[str], cfg: ScalingConfig, bar: tqdm
) -> tuple[list[str], list[float]]:
    """Answers (from the first round) and each question's share of its batch's seconds, over
    `cfg.rounds` rounds after one untimed warm-up batch."""
    system.answer(
        questions[: cfg.batch_size], max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    answers: list[str] = []
    seconds: list[float] = []
    for round_ in range(cfg.rounds):
        for start in range(0, len(questions), cfg.batch_size):
            batch = questions[start : start + cfg.batch_size]
            t0 = time.perf_counter()
            out = system.answer(batch, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
            seconds += [(time.perf_counter() - t0) / len(batch)] * len(batch)
            if round_ == 0:
                answers += out
            bar.update(len(batch))
    return answers, seconds


def _ms(seconds: Sequence[float], percentile: float) -> float:
    return 1000.0 * float(np.percentile(seconds, percentile))


def _measure(
    system: MacSystem,
    targets: Sequence[Document],
    filler: Sequence[Document],
    n: int,
    cfg: ScalingConfig,
) -> dict[str, Any]:
    """One memory size: the first n targets (all of them when n is larger) plus filler."""
    held = list(targets[:n])
    qas = all_questions(held)
    if not qas:
        raise ValueError(f"the first {len(held)} target documents have no questions")
    system.bank = MemoryBank(system.bank.num_tokens, system.bank.width)
    ingest_s = _fill(system, held + list(filler[: n - len(held)]), cfg.ingest_batch, f"fill {n:,}")
    questions = [q.question for q in qas]
    golds = [q.answers for q in qas]
    singles = questions[: cfg.single_questions]
    total = 2 * cfg.rounds * len(questions) + len(singles)
    with tqdm(total=total, desc=f"answer {n:,}", unit="q") as bar:
        answers, seconds = _timed_answers(system, questions, cfg, bar)
        single: list[float] = []
        for q in singles:
            t0 = time.perf_counter()
            system.answer([q], max_new_tokens=cfg.max_new_tokens, batch_size=1)
            single.append(time.perf_counter() - t0)
            bar.update(1)
        with flat_aggregation(system):
            flat_answers, flat_seconds = _timed_answers(system, questions, cfg, bar)
    scores = score(answers, golds)
    return {
        "entries": len(system.bank),
        "targets": len(held),
        "questions": len(qas),
        "f1": scores["f1"],
        "em": scores["em"],
        "answer_ms_median": _ms(seconds, 50),
        "answer_ms_p90": _ms(seconds, 90),
        "single_ms_median": _ms(single, 50),
        "ingest_ms_per_doc": 1000.0 * ingest_s / len(system.bank),
        "bank_bytes": system.bank.nbytes,
        "flat": {
            "f1": score(flat_answers, golds)["f1"],
            "answer_ms_median": _ms(flat_seconds, 50),
            "answer_ms_p90": _ms(flat_seconds, 90),
        },
    }


def _growth(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Largest over smallest memory: entries, and median answer times (and the log-log slope of
    the batched one: 1 is linear growth, 0 bounded)."""
    first, last = rows[0], rows[-1]
    entries = last["entries"] / first["entries"]
    answer = last["answer_ms_median"] / first["answer_ms_median"]
    return {
        "entries": entries,
        "answer": answer,
        "single": last["single_ms_median"] / first["single_ms_median"],
        "flat": last["flat"]["answer_ms_median"] / first["flat"]["answer_ms_median"],
        "answer_slope": math.log(answer) / math.log(entries) if entries > 1 else None,
    }


def run_scaling(
    system: MacSystem,
    targets: Sequence[Document],
    filler: Sequence[Document],
    config: ScalingConfig | None = None,
) -> dict[str, Any]:
    """Fill a fresh bank to each size in `config.sizes` and measure F1, latency and cost."""
    cfg = config or ScalingConfig()
    if not targets:
        raise ValueError("no target documents to score")
    needed = list(targets) + list(filler[: max(0, cfg.sizes[-1] - len(targets))])
    if len(needed) < cfg.sizes[-1]:
        raise ValueError(
            f"{len(targets)} targets and {len(filler)} filler documents cannot fill "
            f"{cfg.sizes[-1]:,} entries"
        )
    if len({d.id for d in needed}) != len(needed):
        raise ValueError("target and filler document ids must be unique")
    own = system.bank
    try:
        rows = [_measure(system, targets, filler, n, cfg) for n in cfg.sizes]
    finally:
        system.bank = own
    agg = system.networks.config.aggregator
    return {
        "config": asdict(cfg),
        "device": str(system.device),
        "aggregator": {"window": agg.window, "chunk": agg.chunk},
        "entry_tokens": system.bank.num_tokens,
        "target_documents": len(targets),
        "rows": rows,
        "growth": _growth(rows),
    }


def scaling_markdown(report: dict[str, Any]) -> str:
    agg = report["aggregator"]
    lines = [
        "# MAC memory scaling",
        "",
        *([f"Reproduce: `{report['command']}`", ""] if report.get("command") else []),
        f"On {report['device']}: {report['target_documents']} target documents (their questions "
        f"scored, closed-book) plus filler articles about other new people. The aggregator folds "
        f"memories over {agg['window']} entries in chunks of {agg['chunk']}; *flat* switches "
        "that off. ms/question is a batch's time over its size "
        f"({report['config']['batch_size']} questions per batch); batch of 1 is one question "
        "alone.",
        "",
        "| entries | F1 | ms/question median | p90 | batch of 1 ms | flat ms/question | "
        "ingest ms/doc | bank MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['entries']:,} | {r['f1']:.3f} | {r['answer_ms_median']:.1f} | "
            f"{r['answer_ms_p90']:.1f} | {r['single_ms_median']:.1f} | "
            f"{r['flat']['answer_ms_median']:.1f} | {r['ingest_ms_per_doc']:.2f} | "
            f"{r['bank_bytes'] / 1e6:.2f} |"
        )
    g, rows = report["growth"], report["rows"]
    slope = "" if g["answer_slope"] is None else f" (log-log slope {g['answer_slope']:.2f})"
    lines += [
        "",
        f"From {rows[0]['entries']:,} to {rows[-1]['entries']:,} entries ({g['entries']:g}× the "
        f"entries) the median answer time per question grew **{g['answer']:.2f}×**{slope}; "
        f"batch of 1: {g['single']:.2f}×; without the hierarchy: {g['flat']:.2f}×.",
    ]
    return "\n".join(lines) + "\n"


def plot_scaling(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    n = [r["entries"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["f1"] for r in rows], "o-", label="hierarchical")
    left.plot(n, [r["flat"]["f1"] for r in rows], "s--", color="grey", label="flat")
    left.set_ylim(0, max(0.05, *(r["f1"] for r in rows), *(r["flat"]["f1"] for r in rows)) * 1.1)
    left.set_ylabel("F1 on the target questions")
    left.set_title("F1 vs memory size")
    right.plot(n, [r["answer_ms_median"] for r in rows], "o-", label="batched, median")
    right.fill_between(
        n,
        [r["answer_ms_median"] for r in rows],
        [r["answer_ms_p90"] for r in rows],
        alpha=0.2,
        label="batched, to p90",
    )
    right.plot(n, [r["single_ms_median"] for r in rows], "^-", label="batch of 1")
    flat = [r["flat"]["answer_ms_median"] for r in rows]
    right.plot(n, flat, "s--", color="grey", label="batched, flat (no hierarchy)")
    first = rows[0]["answer_ms_median"]
    right.plot(n, [first * x / n[0] for x in n], ":", color="black", label="∝ entries")
    right.set_yscale("log")
    right.set_ylabel("ms per question")
    right.set_title("answer latency vs memory size")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("memory entries (documents)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_scaling(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    (out / "scaling.md").write_text(scaling_markdown(report))
    plot_scaling(report, out / "scaling.png")


def run_scaling_study(
    model: str | os.PathLike[str],
    mac_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: ScalingConfig | None = None,
    targets: int = 20,
    command: str | None = None,
) -> dict[str, Any]:
    """The study end to end on any base: the first `targets` documents of `data` (JSONL or
    SQuAD-style JSON), filler from the rest of `data` and then the default world, the report
    written to `out` as scaling.json, scaling.md and scaling.png."""
    cfg = config or ScalingConfig()
    base, tokenizer = load_base(model)
    system = MacSystem.load(mac_dir, base, tokenizer)
    docs = list({d.id: d for d in read_documents(data)}.values())
    target_docs = docs[:targets]
    needed = max(0, cfg.sizes[-1] - len(target_docs))
    own = docs[targets : targets + needed]
    avoid = {d.title for d in target_docs if d.title}
    world = filler_documents(needed - len(own), avoid) if needed > len(own) else []
    filler = own + world
    report = run_scaling(system, target_docs, filler, cfg)
    report |= {
        "model": str(model),
        "mac_dir": str(mac_dir),
        "data": str(data),
        "filler_from_data": len(own),
        "command": command,
    }
    write_scaling(report, Path(out))
    return report
