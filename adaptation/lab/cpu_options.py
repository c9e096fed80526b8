"""`uptake bench --cpu-options`: which CPU settings make a LoRA step and an answer faster on the
base, each as a ratio to float32 on one thread, measured in one process, in interleaved rounds so
that a slow spell on a shared machine hits every variant.

Variants: torch threads (1, 2), the base's dtype (float32, bfloat16), documents per step (1, 2:
the worker's UPTAKE_LEARN_BATCH), a statically shaped KV cache, and optionally `torch.compile`.
A faster variant only counts if it answers as float32 does, so each reports the share of its
greedy answers equal to float32's, and its training loss beside float32's.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptation.answering import generate_answers
from adaptation.learner import fresh_adapter
from adaptation.modeling import LoraSettings, load_base, without_adapters
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting.base import WeightedText, Weighter, encode_weighted

ANSWER_TOKENS = 12


@dataclass(frozen=True)
class Variant:
    name: str
    threads: int = 1
    dtype: str = "float32"
    docs_per_step: int = 1
    generate: dict[str, object] = field(default_factory=dict)
    compiled: bool = False


VARIANTS = (
    Variant("float32, 1 thread (baseline)"),
    Variant("float32, 2 threads", threads=2),
    Variant("bfloat16, 1 thread", dtype="bfloat16"),
    Variant("bfloat16, 2 threads", threads=2, dtype="bfloat16"),
    Variant("float32, 2 documents per step", docs_per_step=2),
    Variant("bfloat16, 2 documents per step", dtype="bfloat16", docs_per_step=2),
    Variant("float32, static KV cache", generate={"cache_implementation": "static"}),
)
COMPILED = Variant("float32, torch.compile", compiled=True)


class _Bench:
    """One base in one dtype with a LoRA adapter, timing steps and answers."""

    def __init__(self, model_name: str, dtype: torch.dtype, weighter: Weighter, texts: list[str]):
        self.model, self.tokenizer = load_base(model_name, "cpu", dtype)
        self.peft = fresh_adapter(self.model, LoraSettings(), seed=0)
        self.updater = OnlineUpdater(self.peft, UpdateConfig(lr=1e-3))
        self.texts = [encode_weighted(t, self.tokenizer, weighter, 1024) for t in texts]

    def step_seconds(self, docs_per_step: int, rounds: int) -> float:
        """Seconds per document over `rounds` steps of `docs_per_step` documents each."""
        started = time.perf_counter()
        for r in range(rounds):
            start = (r * docs_per_step) % len(self.texts)
            self.updater.step(self._take(start, docs_per_step))
        return (time.perf_counter() - started) / (rounds * docs_per_step)

    def losses(self) -> list[float]:
        """The loss on each text (before any step: the base's own, as LoRA starts as a no-op)."""
        with torch.no_grad():
            return [float(self.updater.loss([t])) for t in self.texts]

    def answers(self, questions: Sequence[str], **generate: object) -> tuple[float, list[str]]:
        """Seconds per question, asked one at a time with the adapter off, and the answers."""
        started = time.perf_counter()
        with without_adapters(self.peft):
            out = [
                generate_answers(
                    self.peft, self.tokenizer, [q], max_new_tokens=ANSWER_TOKENS, **generate
                )[0]
                for q in questions
            ]
        return (time.perf_counter() - started) / len(questions), out

    def _take(self, start: int, n: int) -> list[WeightedText]:
        return [self.texts[(start + i) % len(self.texts)] for i in range(n)]


def run_cpu_options(
    model: str,
    weighter: Weighter,
    texts: list[str],
    questions: list[str],
    out: Path,
    rounds: int = 3,
    compile_too: bool = False,
    command: str = "uptake bench --cpu-options",
    log: Callable[[str], None] = print,
) -> dict:
    """Time every variant, `rounds` times each, interleaved; write cpu-options.{json,md,png}."""
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    variants = [*VARIANTS, *([COMPILED] if compile_too else [])]
    benches = {
        d: _Bench(model, getattr(torch, d), weighter, texts) for d in ("float32", "bfloat16")
    }
    reference = benches["float32"].answers(questions)[1]
    losses = {d: b.losses() for d, b in benches.items()}  # before any step: the base's own
    rows: dict[str, dict] = {v.name: {"step": [], "answer": []} for v in variants}
    eager = benches["float32"].model.forward
    compiled = torch.compile(eager, dynamic=True) if compile_too else eager
    try:
        if compile_too:
            log("compiling the float32 forward (minutes on a CPU)")
            torch.set_num_threads(COMPILED.threads)
            benches["float32"].model.forward = compiled
            started = time.perf_counter()
            benches["float32"].answers(questions[:1])
            rows[COMPILED.name]["compile_seconds"] = time.perf_counter() - started
        for r in range(rounds):
            log(f"round {r + 1} of {rounds}")
            for v in variants:
                torch.set_num_threads(v.threads)
                bench = benches[v.dtype]
                if v.dtype == "float32":
                    bench.model.forward = compiled if v.compiled else eager
                seconds, answers = bench.answers(questions, **v.generate)
                row = rows[v.name]
                row["answer"].append(seconds)
                row["same_answers"] = statistics.mean(
                    a == b for a, b in zip(answers, reference, strict=True)
                )
                if not v.generate and not v.compiled:
                    row["step"].append(bench.step_seconds(v.docs_per_step, 2))
    finally:
        benches["float32"].model.forward = eager
        torch.set_num_threads(before)
    for v in variants:
        row = rows[v.name]
        row["answer_seconds"] = statistics.median(row.pop("answer"))
        steps = row.pop("step")
        row["step_seconds_per_document"] = statistics.median(steps) if steps else None
        row["loss_difference"] = max(
            abs(a - b) for a, b in zip(losses[v.dtype], losses["float32"], strict=True)
        )
    base = rows[VARIANTS[0].name]
    for row in rows.values():
        row["answer_speedup"] = base["answer_seconds"] / row["answer_seconds"]
        s = row["step_seconds_per_document"]
        row["step_speedup"] = base["step_seconds_per_document"] / s if s else None
    report = {
        "model": model,
        "rounds": rounds,
        "documents": len(texts),
        "questions": len(questions),
        "tokens_per_document": statistics.mean(t.num_tokens for t in benches["float32"].texts),
        "variants": rows,
        "command": command,
    }
    (out / "cpu-options.json").write_text(json.dumps(report, indent=2))
    (out / "cpu-options.md").write_text(cpu_options_markdown(report))
    plot_cpu_options(report, out / "cpu-options.png")
    return report


def cpu_options_markdown(report: dict) -> str:
    lines = [
        "# CPU options",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        f"Model `{report['model']}`; a LoRA step on {report['documents']} documents of "
        f"{report['tokens_per_document']:.0f} tokens on average, and {report['questions']} "
        f"questions answered one at a time ({ANSWER_TOKENS} new tokens at most); the median of "
        f"{report['rounds']} interleaved rounds. Speed-ups are against float32 on one thread.",
        "",
        "| variant | step s / document | step speed-up | answer s | answer speed-up "
        "| answers as float32's | loss difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["variants"].items():
        step = row["step_seconds_per_document"]
        lines.append(
            f"| {name} | {_num(step)} | {_ratio(row['step_speedup'])} | "
            f"{row['answer_seconds']:.3f} | {_ratio(row['answer_speedup'])} | "
            f"{row['same_answers']:.0%} | {_num(row.get('loss_difference'), 4)} |"
        )
    compile_s = [
        r["compile_seconds"] for r in report["variants"].values() if "compile_seconds" in r
    ]
    if compile_s:
        lines.append(f"\nCompiling took {compile_s[0]:.0f} s before the first answer.")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"**{value:.2f}×**"


def plot_cpu_options(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    rows = list(report["variants"].values())
    fig, ax = plt.subplots(figsize=(9, 4))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], [r["step_speedup"] or 0 for r in rows], 0.4, label="LoRA step")
    ax.barh([i + 0.2 for i in y], [r["answer_speedup"] for r in rows], 0.4, label="answer")
    ax.axvline(1.0, color="grey", ls="--")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over float32 on one thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
