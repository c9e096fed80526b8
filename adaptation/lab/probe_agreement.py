"""How well best-of-k's probe scores stand in for the gold questions' scores: their correlation
over the candidates, which `uptake eval` reports for seal-best."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def correlation(probe: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation of probe scores with gold scores (NaN when either is
    constant or there are fewer than two points)."""
    if len(probe) != len(gold):
        raise ValueError(
            f"need as many probe scores as gold scores, got {len(probe)} and {len(gold)}"
        )
    x = np.asarray(probe, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    if len(x) < 2:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": len(x)}
    return {"pearson": _pearson(x, y), "spearman": _pearson(_ranks(x), _ranks(y)), "n": len(x)}
