"""Where a weighting puts its weight in a knowledge-world article.

Each character is put in one class: `fact` (an answer to one of the article's questions), `entity`
(the name the article is about), `distractor` (any other name, number or date, which a salience
heuristic also picks) or `filler` (the rest); whitespace counts in none. A good weighting puts its
weight on facts and little on distractors; `salient` cannot tell the two apart by construction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaptation.data import Document
from adaptation.weighting.base import Weighter
from adaptation.weighting.salient import SalientWeighter

CLASSES = ("fact", "entity", "distractor", "filler")
_FACT, _ENTITY, _DISTRACTOR, _FILLER = range(4)
_NONE = -1


@dataclass(frozen=True)
class ClassWeight:
    """`relative`: mean weight of the class's characters over the article's mean (1 = average),
    averaged over articles; `share`: the class's part of all the weight."""

    relative: float
    share: float
    chars: int


def char_classes(doc: Document) -> np.ndarray:
    """One class index per character of `doc.text` (-1 for whitespace)."""
    text = doc.text
    labels = np.full(len(text), _FILLER, dtype=np.int64)
    for start, end in SalientWeighter().spans(text):
        labels[start:end] = _DISTRACTOR
    entity = doc.meta.get("entity")
    for name, label in [(entity, _ENTITY)] + [
        (answer, _FACT) for qa in doc.questions for answer in qa.answers
    ]:
        if name:
            for match in re.finditer(re.escape(name), text):
                labels[match.start() : match.end()] = label
    labels[[c.isspace() for c in text]] = _NONE
    return labels


def weight_breakdown(weighter: Weighter, docs: Sequence[Document]) -> dict[str, ClassWeight]:
    totals = np.zeros(len(CLASSES))
    chars = np.zeros(len(CLASSES), dtype=np.int64)
    relative: list[list[float]] = [[] for _ in CLASSES]
    for doc in docs:
        labels = char_classes(doc)
        weights = weighter.char_weights(doc.text).astype(np.float64)
        counted = labels != _NONE
        mean = weights[counted].mean() if counted.any() else 0.0
        for k in range(len(CLASSES)):
            mine = weights[labels == k]
            if mine.size:
                totals[k] += mine.sum()
                chars[k] += mine.size
                if mean > 0:
                    relative[k].append(float(mine.mean() / mean))
    mass = totals.sum() or 1.0
    return {
        name: ClassWeight(
            relative=float(np.mean(relative[k])) if relative[k] else 0.0,
            share=float(totals[k] / mass),
            chars=int(chars[k]),
        )
        for k, name in enumerate(CLASSES)
    }


def breakdown_table(results: dict[str, dict[str, ClassWeight]]) -> str:
    """Markdown: one row per weighting, the relative weight (and share) of each class."""
    head = "| weighting | " + " | ".join(CLASSES) + " |\n| --- |" + " --- |" * len(CLASSES)
    rows = [
        f"| {name} | "
        + " | ".join(f"{c[k].relative:.2f} ({c[k].share:.0%})" for k in CLASSES)
        + " |"
        for name, c in results.items()
    ]
    return "\n".join([head, *rows])
