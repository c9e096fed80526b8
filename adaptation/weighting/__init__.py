"""Token-weighting strategies behind one interface: per-character weights, projected per tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adaptation.weighting.base import WeightedText, Weighter, encode_weighted, project_to_tokens
from adaptation.weighting.salient import SalientWeighter
from adaptation.weighting.tfidf import TfidfWeighter
from adaptation.weighting.uniform import UniformWeighter

WEIGHTER_NAMES = ("uniform", "salient", "tfidf", "camels")


def make_weighter(
    name: str,
    *,
    corpus: Sequence[str] | None = None,
    path: str | Path | None = None,
) -> Weighter:
    """Build a weighter by name.

    tfidf loads from `path` when given, else fits on `corpus`; camels loads a meta-trained
    weighting model from `path` (imported only then, since it pulls in a whole LM).
    """
    key = name.strip().lower()
    if key == "uniform":
        return UniformWeighter()
    if key == "salient":
        return SalientWeighter()
    if key == "tfidf":
        if path is not None:
            return TfidfWeighter.load(path)
        if corpus:
            return TfidfWeighter().fit(corpus)
        raise ValueError(
            "the tfidf weighter needs its idf: pass path= (a saved TfidfWeighter JSON) "
            "or corpus= (texts to fit on)"
        )
    if key == "camels":
        if path is None:
            raise ValueError(
                "the camels weighter needs path= pointing at a meta-trained weighting model "
                "(see `uptake meta-train`)"
            )
        from adaptation.weighting.camels import CamelsWeighter

        return CamelsWeighter.load(path)
    raise ValueError(f"unknown weighter {name!r}; choose one of: {', '.join(WEIGHTER_NAMES)}")


__all__ = [
    "WEIGHTER_NAMES",
    "SalientWeighter",
    "TfidfWeighter",
    "UniformWeighter",
    "WeightedText",
    "Weighter",
    "encode_weighted",
    "make_weighter",
    "project_to_tokens",
]
