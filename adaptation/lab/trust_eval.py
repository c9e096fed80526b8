"""Source-trust experiments behind `uptake trust`: does setting trust resolve conflicting sources
toward the trusted one, and can a model learn reliability from source tags alone (IML)?

Both run on fresh knowledge-world people (strangers to the demo model, with the places and
organisations it knows), each seed drawing other people and another LoRA initialisation.

1. **Explicit trust.** A stream where half the people have one fact stated with different
   values by a `reliable` and an `unreliable` source (in random order), the rest one uncontested
   fact from either. The same stream is learned twice from the same base: with equal trust, and
   with the configured weights. A contested fact is *won* by the source whose value then has
   the lower answer NLL; uncontested facts are checked per source for being learned at all.
2. **Learned trust (METHODS §4).** Stage 1 teaches contested facts with both sources' texts
   prefixed by a tag per source, plus QA pairs that agree with the reliable tag. Stage 2 brings
   new, uncontested people, half under each tag. If the model learned to believe the reliable
   tag, stage-2 facts under it (D1) are taken up more than those under the other (D2). The same
   run without tags is the control, where D1 and D2 differ only by chance.
3. **Where the bound comes from.** Trust can only scale what an update learns. For each
   contested fact, the reliable article alone is learned by an adapter (fresh, or one that has
   already learned other articles), then more articles, and the reliable value's win is checked
   after each: how much one article moves the answer, and how long that lasts in a stream.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptation.best_of_k import answer_nll
from adaptation.data import QA, Document, all_questions
from adaptation.lab.conflicts import (
    ConflictConfig,
    answer_outcomes,
    build_conflicts,
    conflict_items,
    fresh_world,
    trusted_win_rate,
)
from adaptation.lab.evaluation import EvalConfig, LoraMethod
from adaptation.lab.world import WorldConfig
from adaptation.learner import LearnSettings
from adaptation.metrics import score
from adaptation.modeling import LoraSettings
from adaptation.prompts import qa_tokens
from adaptation.trust import SourceTrust
from adaptation.weighting import make_weighter
from adaptation.weighting.base import WeightedText

RELIABLE = "reliable"
UNRELIABLE = "unreliable"
SOURCES = (RELIABLE, UNRELIABLE)
# Equal trust, the configured trust, and the bound: the unreliable source not learned at all.
SETTINGS = ("equal", "trusted", "reliable_only")


@dataclass(frozen=True)
class TrustConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    people: int = 100
    trusted: float = 1.0
    distrusted: float = 0.2
    lr: float = 1e-3
    steps_per_doc: int = 2
    lora_rank: int = 16
    iml_people: int = 60
    iml_new_people: int = 60
    iml_epochs: int = 3
    # Experiment 3: at the configured update and at a strong one, starting fresh and after
    # `forget_warm` articles, the win after 0 and up to `forget_after` further articles.
    forget_items: int = 25
    forget_warm: int = 25
    forget_after: tuple[int, ...] = (0, 10, 25)
    strong_lr: float = 3e-3
    strong_steps: int = 4
    device: str | None = None
    world_seed: int = 0

    def __post_init__(self) -> None:
        """Fail before the first experiment, not after two of them have run."""
        if not self.forget_after or list(self.forget_after) != sorted(set(self.forget_after)):
            raise ValueError(f"forget_after must rise, got {self.forget_after}")
        uncontested = self.people - round(self.people * ConflictConfig().conflict_fraction)
        needed = self.forget_warm + max(self.forget_after)
        if uncontested < needed:
            raise ValueError(
                f"{self.people} people give {uncontested} uncontested articles; experiment 3 "
                f"learns {needed} ({self.forget_warm} before a fact and {max(self.forget_after)} "
                f"after it): use at least {2 * needed} people"
            )


def _learner(
    model_dir: str, cfg: TrustConfig, seed: int, tag_salt: str | None = None
) -> LoraMethod:
    eval_cfg = EvalConfig(
        lr=cfg.lr,
        steps_per_doc=cfg.steps_per_doc,
        lora=LoraSettings(rank=cfg.lora_rank),
        learning=LearnSettings(tag_salt=tag_salt),
        device=cfg.device,
    )
    return LoraMethod(model_dir, make_weighter("uniform"), eval_cfg, cfg.lr, seed)


def _nll(method: LoraMethod, qas: Sequence[QA]) -> float:
    pairs = [(q.question, q.answers[0]) for q in qas]
    return statistics.fmean(answer_nll(method.model, method.tokenizer, pairs)) if pairs else 0.0


def _fact_scores(method: LoraMethod, qas: Sequence[QA]) -> dict[str, float]:
    """Closed-book F1 and mean gold-answer NLL: F1 for what a user sees, NLL because a small
    model's knowledge often moves well before its greedy answer flips."""
    preds = method.answer([q.question for q in qas])
    return {"f1": score(preds, [q.answers for q in qas])["f1"], "nll": _nll(method, qas)}


def _by_source(docs: Sequence[Document], source: str) -> list[QA]:
    return all_questions([d for d in docs if d.source == source])


def explicit_trust_run(model_dir: str, cfg: TrustConfig, seed: int) -> dict[str, object]:
    """One seed of experiment 1: the same conflicting stream under equal and under set trust."""
    world = fresh_world(WorldConfig(seed=cfg.world_seed), draw=seed)
    docs = build_conflicts(world, ConflictConfig(people=cfg.people))
    items = conflict_items(docs)
    plain = [d for d in docs if not d.meta.get("conflict")]
    settings: dict[str, dict[str, float]] = {
        "equal": {},
        "trusted": {RELIABLE: cfg.trusted, UNRELIABLE: cfg.distrusted},
        "reliable_only": {RELIABLE: cfg.trusted, UNRELIABLE: 0.0},
    }
    out: dict[str, object] = {"seed": seed, "contested": len(items)}
    for name, weights in settings.items():
        trust = SourceTrust(weights)
        method = _learner(model_dir, cfg, seed)
        if name == "equal":
            out["before"] = {s: _fact_scores(method, _by_source(plain, s)) for s in SOURCES}
            out["before_win_rate"] = trusted_win_rate(method.model, method.tokenizer, items)
        for doc in tqdm(docs, desc=f"trust seed={seed} {name}", unit="doc", leave=False):
            method.ingest(doc, trust.update_scale(doc.source))
        outcomes = answer_outcomes(method.answer([c.question for c in items]), items)
        out[name] = {
            "win_rate": trusted_win_rate(method.model, method.tokenizer, items),
            "answers": outcomes,
            "uncontested": {s: _fact_scores(method, _by_source(plain, s)) for s in SOURCES},
        }
    return out


def _qa_text(method: LoraMethod, qa: QA) -> WeightedText:
    """A QA pair as a training example with the loss on the answer only."""
    ids, start = qa_tokens(method.tokenizer, qa.question, qa.answers[0])
    weights = torch.zeros(len(ids))
    weights[start:] = 1.0
    return WeightedText(input_ids=torch.tensor(ids, dtype=torch.long), weights=weights)


def _swap_sources(docs: Sequence[Document]) -> list[Document]:
    flip = {RELIABLE: UNRELIABLE, UNRELIABLE: RELIABLE}
    return [replace(d, source=flip[str(d.source)]) for d in docs]


def learned_trust_run(model_dir: str, cfg: TrustConfig, seed: int, tags: bool) -> dict[str, object]:
    """One seed of experiment 2, with or without source tags.

    Stage 2 is run twice from the same stage 1, the second time with every stage-2 person under
    the other source, and the gap averages the two: which people (and which relations) a source
    happens to get then cancels out, and what is left is the source. Without tags the two runs
    train on identical text, so the control's gap is 0 by construction; it shows the design
    leaves nothing else behind.
    """
    world = fresh_world(WorldConfig(seed=cfg.world_seed), draw=1000 + seed)
    stage1 = build_conflicts(world, ConflictConfig(people=cfg.iml_people, conflict_fraction=1.0))
    stage2 = build_conflicts(
        world, ConflictConfig(people=cfg.iml_new_people, conflict_fraction=0.0)
    )
    label = "tagged" if tags else "untagged"
    drops: dict[str, float] = {}
    for arm, docs in (("a", stage2), ("b", _swap_sources(stage2))):
        method = _learner(model_dir, cfg, seed, tag_salt=f"iml:{seed}" if tags else None)
        # Stage 1 repeats its texts for epochs, so the losses the updater's explosion check takes
        # as typical fall far below any new text's, and it would refuse all of stage 2. The
        # checks for non-finite losses and weights stay on.
        updater = method.learner.updater
        updater.config = replace(updater.config, divergence_factor=math.inf)
        groups = {src: _by_source(docs, src) for src in SOURCES}
        before = {src: _nll(method, qas) for src, qas in groups.items()}
        steps: list[Document | QA] = [*stage1, *all_questions(stage1)]
        rng = random.Random(f"iml:{seed}")
        for epoch in range(cfg.iml_epochs):
            rng.shuffle(steps)
            desc = f"iml seed={seed} {label} run {arm} stage 1 epoch {epoch + 1}"
            for step in tqdm(steps, desc=desc, leave=False):
                if isinstance(step, Document):
                    method.ingest(step)
                else:
                    updater.apply([_qa_text(method, step)])
        for doc in docs:
            method.ingest(doc)
        for src, qas in groups.items():
            drops[f"{arm}_{src}"] = before[src] - _nll(method, qas)
    d1 = (drops[f"a_{RELIABLE}"] + drops[f"b_{RELIABLE}"]) / 2
    d2 = (drops[f"a_{UNRELIABLE}"] + drops[f"b_{UNRELIABLE}"]) / 2
    return {"seed": seed, "tags": tags, "d1_nll_drop": d1, "d2_nll_drop": d2, "runs": drops}


def forgetting_run(
    model_dir: str, cfg: TrustConfig, seed: int, lr: float, steps: int, warm: int
) -> dict[str, object]:
    """One seed of experiment 3: per contested fact, from the same adapter state, learn the
    reliable article and then the stream's uncontested articles, scoring the win as they come."""
    world = fresh_world(WorldConfig(seed=cfg.world_seed), draw=seed)
    docs = build_conflicts(world, ConflictConfig(people=cfg.people))
    plain = [d for d in docs if not d.meta.get("conflict")]
    later = plain[warm : warm + max(cfg.forget_after)]
    if len(later) < max(cfg.forget_after):
        raise ValueError(
            f"{len(plain)} uncontested articles cannot warm {warm} and follow with "
            f"{max(cfg.forget_after)}: raise people or lower forget_warm / forget_after"
        )
    article = {d.questions[0].question: d for d in docs if d.meta.get("conflict") and d.questions}
    method = _learner(model_dir, replace(cfg, lr=lr, steps_per_doc=steps), seed)
    for doc in plain[:warm]:
        method.ingest(doc)
    start = method.learner.updater.snapshot()
    wins = dict.fromkeys(cfg.forget_after, 0.0)
    items = conflict_items(docs)[: cfg.forget_items]
    before = trusted_win_rate(method.model, method.tokenizer, items)
    desc = f"forgetting seed={seed} lr={lr:g}x{steps} after {warm}"
    for item in tqdm(items, desc=desc, leave=False):
        method.learner.updater.restore(start)
        method.ingest(article[item.question])
        seen = 0
        for k in cfg.forget_after:
            for doc in later[seen:k]:
                method.ingest(doc)
            seen = k
            wins[k] += trusted_win_rate(method.model, method.tokenizer, [item]) / len(items)
    return {
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "warm": warm,
        "win_before": before,
        "win_after": wins,
    }


def _forgetting_cases(cfg: dict) -> list[tuple[float, int, int]]:
    """(lr, steps, warm) of experiment 3, from a TrustConfig as a dict (as the report holds it)."""
    rates = [(cfg["lr"], cfg["steps_per_doc"]), (cfg["strong_lr"], cfg["strong_steps"])]
    return [(lr, steps, warm) for lr, steps in rates for warm in (0, cfg["forget_warm"])]


def _stat(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _forgetting_key(lr: float, steps: int, warm: int, after: int | str) -> str:
    return f"forget_{lr:g}x{steps}_warm{warm}_after{after}"


def summarise(
    explicit: Sequence[dict], learned: Sequence[dict], forgetting: Sequence[dict] = ()
) -> dict[str, object]:
    """Means and spreads over seeds of what the acceptance asks about."""
    summary: dict[str, object] = {
        "win_rate_before": _stat([r["before_win_rate"] for r in explicit]),
    }
    for name in SETTINGS:
        summary[f"win_rate_{name}"] = _stat([r[name]["win_rate"] for r in explicit])
        summary[f"answers_{name}"] = _stat([r[name]["answers"]["trusted"] for r in explicit])
        for src in SOURCES:
            summary[f"uncontested_{name}_{src}_nll_drop"] = _stat(
                [r["before"][src]["nll"] - r[name]["uncontested"][src]["nll"] for r in explicit]
            )
            summary[f"uncontested_{name}_{src}_f1_gain"] = _stat(
                [r[name]["uncontested"][src]["f1"] - r["before"][src]["f1"] for r in explicit]
            )
    for tags in (True, False):
        rows = [r for r in learned if r["tags"] == tags]
        key = "tagged" if tags else "untagged"
        summary[f"iml_{key}_nll_gap"] = _stat([r["d1_nll_drop"] - r["d2_nll_drop"] for r in rows])
    cases: dict[str, list[float]] = {}
    for r in forgetting:
        for after, win in [("before", r["win_before"]), *r["win_after"].items()]:
            key = _forgetting_key(r["lr"], r["steps"], r["warm"], after)
            cases.setdefault(key, []).append(win)
    summary |= {key: _stat(wins) for key, wins in cases.items()}
    return summary


def _pm(s: dict[str, float], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    return f"{s['mean']:{fmt}} ± {s['std']:.3f}"


def trust_markdown(report: dict) -> str:
    cfg, s = report["config"], report["summary"]
    n = len(cfg["seeds"])
    lines = [
        "# uptake trust: conflicting sources",
        "",
        f"Model `{report['model']}`; LoRA rank {cfg['lora_rank']}, lr {cfg['lr']:g} × "
        f"{cfg['steps_per_doc']} steps per document; {n} seeds (± is the standard deviation). "
        f"Each seed draws {cfg['people']} new people, half with one contested fact.",
        "",
        "## 1. Explicit trust",
        "",
        "A contested fact is won by the source whose value has the lower answer NLL after the "
        "stream; 'greedy answer' counts generated answers closer to the reliable value (the "
        "rest are closer to the unreliable one or to neither).",
        "",
        "| trust (reliable / unreliable) | reliable wins (NLL) | greedy answer = reliable |",
        "| --- | --- | --- |",
        f"| before the stream | {_pm(s['win_rate_before'])} | – |",
        f"| equal (1.0 / 1.0) | {_pm(s['win_rate_equal'])} | {_pm(s['answers_equal'])} |",
        f"| set ({cfg['trusted']:g} / {cfg['distrusted']:g}) | {_pm(s['win_rate_trusted'])} | "
        f"{_pm(s['answers_trusted'])} |",
        f"| reliable only ({cfg['trusted']:g} / 0) | {_pm(s['win_rate_reliable_only'])} | "
        f"{_pm(s['answers_reliable_only'])} |",
        "",
        "Uncontested facts, per source: the drop in gold-answer NLL and the F1 gain over the "
        "stream (above zero: learned):",
        "",
        "| trust | source | NLL drop | F1 gain |",
        "| --- | --- | --- | --- |",
    ]
    for name in SETTINGS:
        for src in SOURCES:
            lines.append(
                f"| {name} | {src} | {_pm(s[f'uncontested_{name}_{src}_nll_drop'], True)} | "
                f"{_pm(s[f'uncontested_{name}_{src}_f1_gain'], True)} |"
            )
    lines += [
        "",
        "## 2. Learned trust from source tags (IML, experimental)",
        "",
        f"Stage 1: {cfg['iml_people']} contested people, {cfg['iml_epochs']} epochs of both "
        "sources' texts plus QA that agrees with the reliable source. Stage 2: "
        f"{cfg['iml_new_people']} new people, half under each source (D1 reliable, D2 "
        "unreliable), all true; stage 2 runs twice, the second time with the people's sources "
        "swapped, and the gap averages both, so it measures the source and not the people. "
        "Gap = the drop in gold-answer NLL on D1 minus that on D2; above zero means the model "
        "believes the reliable tag more. Without tags both runs see identical text, so the "
        "control's gap is 0 by construction.",
        "",
        "| training text | D1 − D2 gap in answer-NLL drop |",
        "| --- | --- |",
        f"| tagged | {_pm(s['iml_tagged_nll_gap'], True)} |",
        f"| untagged (control) | {_pm(s['iml_untagged_nll_gap'], True)} |",
        "",
        "## 3. Where the bound comes from",
        "",
        f"For each of {cfg['forget_items']} contested facts per seed, the reliable article "
        "alone is learned, starting from a fresh adapter or from one that has already learned "
        f"{cfg['forget_warm']} other articles (its Adam moments included); then more of the "
        "stream's uncontested articles. The share of those facts the reliable value wins "
        "before its article, and after it and each number of further articles. Trust only "
        "scales an update down, so what the reliable article alone achieves bounds it:",
        "",
        "| update | start | before | "
        + " | ".join(f"after {k}" for k in cfg["forget_after"])
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in cfg["forget_after"]) + " |",
    ]
    for lr, steps, warm in _forgetting_cases(cfg):
        start = "fresh adapter" if warm == 0 else f"after {warm} articles"
        columns = ("before", *cfg["forget_after"])
        cells = [_pm(s[_forgetting_key(lr, steps, warm, k)]) for k in columns]
        lines.append(f"| lr {lr:g} × {steps} | {start} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![trust](trust.png)",
        "",
    ]
    return "\n".join(lines)


def plot_trust(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, curve) = plt.subplots(1, 3, figsize=(15, 4))
    explicit = report["explicit"]
    for x, name in enumerate(SETTINGS):
        rates = [r[name]["win_rate"] for r in explicit]
        left.bar(
            x, statistics.fmean(rates), color=("tab:gray", "tab:blue", "tab:cyan")[x], alpha=0.7
        )
        left.scatter([x] * len(rates), rates, color="black", zorder=3, s=12)
    left.axhline(0.5, ls=":", color="gray")
    left.axhline(0.8, ls="--", color="tab:green", label="target 0.8")
    left.set_xticks(range(len(SETTINGS)), ["equal trust", "trust set", "reliable only"])
    left.set_ylim(0, 1)
    left.set_ylabel("contested facts won by the reliable source")
    left.legend(loc="lower right")
    learned = report["learned"]
    for x, tags in enumerate((False, True)):
        gaps = [r["d1_nll_drop"] - r["d2_nll_drop"] for r in learned if r["tags"] == tags]
        right.bar(x, statistics.fmean(gaps), color=("tab:gray", "tab:orange")[x], alpha=0.7)
        right.scatter([x] * len(gaps), gaps, color="black", zorder=3, s=12)
    right.axhline(0, color="gray", lw=0.8)
    right.set_xticks([0, 1], ["untagged (control)", "source tags"])
    right.set_ylabel("D1 − D2 gap in NLL drop")
    right.set_title("learned trust (IML)")
    cfg, summary = report["config"], report["summary"]
    for lr, steps, warm in _forgetting_cases(cfg):
        wins = [summary[_forgetting_key(lr, steps, warm, k)]["mean"] for k in cfg["forget_after"]]
        start = "fresh" if warm == 0 else f"after {warm}"
        curve.plot(
            cfg["forget_after"],
            wins,
            marker="o",
            ls="-" if warm == 0 else "--",
            label=f"lr {lr:g} × {steps}, {start}",
        )
    curve.axhline(0.8, ls=":", color="tab:green")
    curve.set_ylim(0, 1)
    curve.set_xlabel("articles learned after the reliable one")
    curve.set_ylabel("reliable value wins")
    curve.set_title("one article's effect in a stream")
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_trust(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: TrustConfig,
    log: Callable[[str], None] = print,
) -> dict:
    """Both experiments over every seed; writes trust.json, trust.md and trust.png."""
    model = str(model_dir)
    explicit, learned = [], []
    for seed in cfg.seeds:
        r = explicit_trust_run(model, cfg, seed)
        explicit.append(r)
        log(
            f"seed {seed}: reliable wins {r['equal']['win_rate']:.2f} with equal trust, "
            f"{r['trusted']['win_rate']:.2f} with trust set"
        )
        for tags in (False, True):
            g = learned_trust_run(model, cfg, seed, tags)
            learned.append(g)
            log(
                f"seed {seed} {'tagged' if tags else 'untagged'}: D1 − D2 NLL-drop gap "
                f"{g['d1_nll_drop'] - g['d2_nll_drop']:+.3f}"
            )
    forgetting = []
    for seed in cfg.seeds:
        for lr, steps, warm in _forgetting_cases(asdict(cfg)):
            f = forgetting_run(model, cfg, seed, lr, steps, warm)
            forgetting.append(f)
            wins = ", ".join(f"{w:.2f}" for w in f["win_after"].values())  # type: ignore[attr-defined]
            log(f"seed {seed} lr {lr:g} × {steps} after {warm} articles: wins {wins}")
    report = {
        "model": model,
        "config": asdict(cfg),
        "explicit": explicit,
        "learned": learned,
        "forgetting": forgetting,
        "summary": summarise(explicit, learned, forgetting),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trust.json").write_text(json.dumps(report, indent=2))
    (out / "trust.md").write_text(trust_markdown(report))
    plot_trust(report, out / "trust.png")
    return report
