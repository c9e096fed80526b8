"""SQuAD exact match and token F1, the scores every evaluation in the project reports.

Standard (strict) EM: the normalised prediction must equal a normalised gold answer. The
CaMeLS reference's prefix match is more lenient and is deliberately not used here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 after normalisation; two empty answers agree fully, one empty scores 0."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(golds: Sequence[str]) -> Sequence[str]:
    # A question without gold answers is unanswerable: only an empty prediction is right.
    return golds if golds else ("",)


def best_em(prediction: str, golds: Sequence[str]) -> float:
    return max(exact_match(prediction, g) for g in _golds(golds))


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    return max(f1(prediction, g) for g in _golds(golds))


def score(predictions: Sequence[str], golds_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 over questions, each against its best gold answer; n=0 gives zeros."""
    if isinstance(golds_list, str) or any(isinstance(g, str) for g in golds_list):
        raise TypeError("golds_list needs one list of gold answers per prediction, not strings")
    if len(predictions) != len(golds_list):
        raise ValueError(
            f"{len(predictions)} predictions but {len(golds_list)} gold-answer lists; "
            "pass one list of gold answers per prediction"
        )
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "n": 0}
    em = sum(best_em(p, g) for p, g in zip(predictions, golds_list))
    f = sum(best_f1(p, g) for p, g in zip(predictions, golds_list))
    return {"em": em / n, "f1": f / n, "n": n}
