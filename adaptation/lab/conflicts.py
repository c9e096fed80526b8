"""Conflicting sources in the knowledge world: the same fact with different values from a reliable
and an unreliable source, mixed with uncontested facts from both.

Questions about a contested fact expect the reliable value. Each pair's two articles land in the
stream in random order, so recency alone favours neither source: with equal trust the reliable
value should win about half the time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.best_of_k import answer_nll
from adaptation.data import QA, Document, write_documents
from adaptation.lab.world import HEADLINES, PERSON_FACTS, ROLES, Person, World, WorldConfig
from adaptation.metrics import best_f1


@dataclass(frozen=True)
class ConflictConfig:
    people: int = 100
    conflict_fraction: float = 0.5
    reliable: str = "reliable"
    unreliable: str = "unreliable"

    def __post_init__(self) -> None:
        if self.people < 1:
            raise ValueError(f"people must be at least 1, got {self.people}")
        if not 0.0 <= self.conflict_fraction <= 1.0:
            raise ValueError(f"conflict_fraction must be in [0, 1], got {self.conflict_fraction}")
        if self.reliable == self.unreliable:
            raise ValueError("the reliable and unreliable sources need different names")


@dataclass(frozen=True)
class ConflictItem:
    """A contested fact's question, with the value each source gave."""

    question: str
    reliable: str
    unreliable: str


def _other_value(world: World, relation: str, value: str) -> str:
    if relation == "birth_year":
        return str(int(value) + world.rng.choice([-1, 1]) * world.rng.randint(1, 15))
    pool = {
        "birthplace": world.places,
        "residence": world.places,
        "employer": [o.name for o in world.orgs],
        "role": ROLES,
    }[relation]
    return world.rng.choice([v for v in pool if v != value])


def _article(world: World, p: Person, relation: str, value: str, avoid: Sequence[str]) -> str:
    """An article stating one fact; its filler names none of `avoid` (both contested values), so
    an article never mentions the other source's value in passing."""
    fact = world._fact(PERSON_FACTS[relation][0], p.name, value, p.pronoun[1])
    return world._article(world.rng.choice(HEADLINES).format(name=p.name), [fact], avoid)


def build_conflicts(world: World, config: ConflictConfig | None = None) -> list[Document]:
    """One article per source per contested fact, one article per uncontested fact (the sources
    alternating), shuffled into one time-ordered stream."""
    cfg = config or ConflictConfig()
    rng = world.rng
    n_conflicts = round(cfg.people * cfg.conflict_fraction)
    drafts: list[tuple[str, str, str, tuple[QA, ...], dict[str, object]]] = []
    for i in range(cfg.people):
        p = world.person()
        relation = rng.choice(sorted(PERSON_FACTS))
        value = p.facts[relation]
        qa = (QA(rng.choice(PERSON_FACTS[relation][1]).format(name=p.name), (value,)),)
        meta: dict[str, object] = {"entity": p.name, "relations": [relation]}
        if i < n_conflicts:
            wrong = _other_value(world, relation, value)
            both = (value, wrong)
            meta |= {"conflict": True, "reliable_value": value, "unreliable_value": wrong}
            drafts.append(
                (f"cf-{i}-r", cfg.reliable, _article(world, p, relation, value, both), qa, meta)
            )
            drafts.append(
                (f"cf-{i}-u", cfg.unreliable, _article(world, p, relation, wrong, both), (), meta)
            )
        else:
            source = cfg.reliable if i % 2 == 0 else cfg.unreliable
            drafts.append(
                (
                    f"nc-{i}",
                    source,
                    _article(world, p, relation, value, (value,)),
                    qa,
                    meta | {"conflict": False},
                )
            )
    rng.shuffle(drafts)
    start = date(2025, 1, 1)
    return [
        Document(
            id=doc_id,
            text=text,
            source=source,
            time=(start + timedelta(days=t)).isoformat(),
            title=str(meta["entity"]),
            questions=qs,
            meta=dict(meta),
        )
        for t, (doc_id, source, text, qs, meta) in enumerate(drafts)
    ]


def fresh_world(config: WorldConfig | None = None, draw: int = 0) -> World:
    """The world with its own splits already drawn, so new people are strangers to a model
    pretrained on it while places and organisations are the ones it knows. `draw` reseeds what
    follows: each draw gives other people."""
    world = World(config or WorldConfig())
    world.splits()
    world.rng.seed(f"conflicts:{draw}")
    return world


def write_conflicts(
    out_dir: str | os.PathLike[str],
    world_config: WorldConfig | None = None,
    config: ConflictConfig | None = None,
) -> Path:
    path = Path(out_dir) / "conflicts.jsonl"
    write_documents(path, build_conflicts(fresh_world(world_config), config))
    return path


def conflict_items(docs: Sequence[Document]) -> list[ConflictItem]:
    return [
        ConflictItem(q.question, str(d.meta["reliable_value"]), str(d.meta["unreliable_value"]))
        for d in docs
        if d.meta.get("conflict")
        for q in d.questions
    ]


def trusted_win_rate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[ConflictItem]
) -> float:
    """Share of contested facts where the reliable value is more likely than the unreliable one."""
    if not items:
        raise ValueError("no contested facts to score")
    nll_r = answer_nll(model, tokenizer, [(c.question, c.reliable) for c in items])
    nll_u = answer_nll(model, tokenizer, [(c.question, c.unreliable) for c in items])
    return sum(r < u for r, u in zip(nll_r, nll_u, strict=True)) / len(items)


def answer_outcomes(predictions: Sequence[str], items: Sequence[ConflictItem]) -> dict[str, float]:
    """Shares of generated answers closer to the reliable value, to the unreliable one, or to
    neither (equal F1, usually both 0)."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} contested facts")
    n = max(len(items), 1)
    reliable = unreliable = 0
    for pred, item in zip(predictions, items, strict=True):
        r, u = best_f1(pred, [item.reliable]), best_f1(pred, [item.unreliable])
        reliable += r > u
        unreliable += u > r
    return {
        "trusted": reliable / n,
        "untrusted": unreliable / n,
        "neither": (len(items) - reliable - unreliable) / n,
        "n": len(items),
    }
