"""Source trust: how strongly a document is learned depends on who sent it.

Each source has a weight in [0, 1], set by an admin; unknown sources get the default. The weight
scales the document's update. The updater's optimizer is Adam, which normalises gradient size
away, so scaling the loss alone barely changes a step; `apply_trusted` therefore scales the loss
(which keeps a distrusted document out of Adam's moments) and the step size together, and a
weight of 0 skips the update entirely.

The experimental alternative (IML) leaves trust to the model: training text is prefixed with a
per-source tag, so that the model can learn which tags to believe.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import string
from collections.abc import Mapping
from typing import Any

from adaptation.updater import OnlineUpdater, StepReport
from adaptation.weighting.base import WeightedText

TAG_LENGTH = 8


def check_weight(weight: object, what: str = "trust weight") -> float:
    """A weight as a float in [0, 1], or a ValueError that says what was wrong."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(f"{what} must be a number in [0, 1], got {weight!r}")
    value = float(weight)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {weight!r}")
    return value


def _check_source(source: object) -> str:
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"a source name must be a non-empty string, got {source!r}")
    return source


class SourceTrust:
    """Per-source trust weights with a default for sources nobody has rated."""

    def __init__(self, weights: Mapping[str, float] | None = None, default: float = 1.0) -> None:
        self.default = check_weight(default, "default trust weight")
        self._weights: dict[str, float] = {}
        for source, weight in (weights or {}).items():
            self.set(source, weight)

    def set(self, source: str, weight: float) -> None:
        name = _check_source(source)
        self._weights[name] = check_weight(weight, f"trust weight for source {name!r}")

    def remove(self, source: str) -> None:
        self._weights.pop(source, None)

    def update_scale(self, source: str | None) -> float:
        """How strongly a document from `source` is learned (None means an unnamed source)."""
        if source is None:
            return self.default
        return self._weights.get(source, self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "sources": dict(self._weights)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SourceTrust:
        sources = raw.get("sources", {})
        if not isinstance(sources, Mapping):
            raise ValueError(f"'sources' must map source names to weights, got {sources!r}")
        return cls(sources, raw.get("default", 1.0))


def apply_trusted(
    updater: OnlineUpdater, docs: list[WeightedText], weight: float
) -> list[StepReport]:
    """`updater.apply` with the update scaled by a trust weight in [0, 1].

    The loss and the learning rate are both multiplied by the weight for these steps, so the
    parameter change shrinks in proportion under Adam as it would under SGD. Weight 0 takes no
    step, leaving the weights and the optimizer's moments as they were. The updater sees the
    scaled loss, so its explosion check compares scaled values: a stream mostly of low-trust
    documents makes a trusted document's loss look large (see UpdateConfig.divergence_factor).
    """
    w = check_weight(weight)
    if w == 0.0:
        return []
    if w == 1.0:
        return updater.apply(docs)
    groups = updater.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g, lr in zip(groups, lrs, strict=True):
        g["lr"] = lr * w
    try:
        return updater.apply(docs, scale=w)
    finally:
        for g, lr in zip(groups, lrs, strict=True):
            g["lr"] = lr


def source_tag(source: str, salt: str = "") -> str:
    """A random-looking lowercase tag that depends only on the source name (and the salt).

    Vary `salt` across seeds so that an effect is not an artefact of one particular string.
    """
    digest = hashlib.sha256(f"{salt}\0{_check_source(source)}".encode()).digest()
    letters = string.ascii_lowercase
    return "".join(letters[b % len(letters)] for b in digest[:TAG_LENGTH])


def tag_text(text: str, source: str | None, salt: str = "") -> str:
    """Prefix training text with its source's tag; text from an unnamed source stays untagged."""
    if source is None:
        return text
    return f"{source_tag(source, salt)} {text}"
