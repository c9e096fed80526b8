"""TF-IDF weights: words rare in the corpus but present in the document carry the loss.

A CaMeLS baseline. Every character takes the tf-idf of the word covering it (spaces and
punctuation take 0), scaled so the document's top word weighs 1. Words never seen in the fitting
corpus count as the rarest possible, which suits a stream whose point is new names.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

_WORD = re.compile(r"[^\W_]+")
_FORMAT = "uptake.tfidf/1"


class TfidfWeighter:
    """Word IDF learnt by `fit`; `quantile` zeroes each document's words below that quantile."""

    name = "tfidf"

    def __init__(self, quantile: float | None = None) -> None:
        if quantile is not None and not 0.0 <= quantile < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {quantile}")
        self.quantile = quantile
        self.n_docs = 0
        self.idf: dict[str, float] = {}

    def fit(self, corpus: Iterable[str]) -> TfidfWeighter:
        """Learn document frequencies; smoothed idf = ln((1 + N) / (1 + df)) + 1."""
        df: Counter[str] = Counter()
        n_docs = 0
        for text in tqdm(corpus, desc="tf-idf fit", unit="doc", disable=None):
            df.update({w.lower() for w in _WORD.findall(text)})
            n_docs += 1
        if n_docs == 0:
            raise ValueError("cannot fit tf-idf on an empty corpus; pass at least one document")
        self.n_docs = n_docs
        self.idf = {w: math.log((1 + n_docs) / (1 + n)) + 1.0 for w, n in df.items()}
        return self

    def _unseen_idf(self) -> float:
        return math.log(1 + self.n_docs) + 1.0

    def char_weights(self, text: str) -> np.ndarray:
        if self.n_docs == 0:
            raise RuntimeError("TfidfWeighter is not fitted: call fit(corpus) or load(path) first")
        weights = np.zeros(len(text), dtype=np.float32)
        matches = list(_WORD.finditer(text))
        if not matches:
            return weights
        words = [m.group().lower() for m in matches]
        tf = Counter(words)
        unseen = self._unseen_idf()
        scores = np.array([tf[w] * self.idf.get(w, unseen) for w in words], dtype=np.float32)
        scores /= scores.max()
        if self.quantile is not None:
            scores[scores < np.quantile(scores, self.quantile)] = 0.0
        for m, s in zip(matches, scores):
            weights[m.start() : m.end()] = s
        return weights

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _FORMAT,
            "n_docs": self.n_docs,
            "quantile": self.quantile,
            "idf": self.idf,
        }
        path.write_text(json.dumps(payload, ensure_ascii=False, sort_keys=True), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TfidfWeighter:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved TfidfWeighter (expected format {_FORMAT})")
        weighter = cls(quantile=payload["quantile"])
        weighter.n_docs = int(payload["n_docs"])
        weighter.idf = {str(w): float(v) for w, v in payload["idf"].items()}
        return weighter
