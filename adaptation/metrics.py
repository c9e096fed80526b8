"""SQuAD exact match and token F1, the scores every evaluation in the project reports, and
gold-token recall of the prediction's first sentence.

Standard (strict) EM: the normalised prediction must equal a normalised gold answer. The
CaMeLS reference's prefix match is more lenient and is deliberately not used here. A model that
answers in whole sentences ("Alda Venn was born in Marrow Bay.") loses F1 to its extra words
although it knows the answer; recall counts the gold tokens its first sentence holds, and reading
only the first sentence (of an answer already capped in tokens) keeps a long answer from
collecting gold tokens by listing everything.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# A sentence ends at a line break, or at . ! ? before whitespace (so 3.5 and 1,024.5 stay whole).
_SENTENCE_END = re.compile(r"\n|(?<=[.!?])\s")


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


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (an abbreviation such as "Dr." ends it early)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def recall(prediction: str, gold: str) -> float:
    """The share of the gold answer's normalised tokens found in the prediction's first
    sentence (each counted as often as the gold has it); an empty gold is matched only by an
    empty prediction, as in F1."""
    pred_tokens = normalize_answer(first_sentence(prediction)).split()
    gold_tokens = normalize_answer(gold).split()
    if not gold_tokens:
        return float(not pred_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    return common / len(gold_tokens)


def _golds(golds: Sequence[str]) -> Sequence[str]:
    # A question without gold answers is unanswerable: only an empty prediction is right.
    return golds if golds else ("",)


def best_em(prediction: str, golds: Sequence[str]) -> float:
    return max(exact_match(prediction, g) for g in _golds(golds))


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    return max(f1(prediction, g) for g in _golds(golds))


def best_recall(prediction: str, golds: Sequence[str]) -> float:
    return max(recall(prediction, g) for g in _golds(golds))


def score(predictions: Sequence[str], golds_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM, F1 and first-sentence recall over questions, each against its best gold answer;
    n=0 gives zeros."""
    if isinstance(golds_list, str) or any(isinstance(g, str) for g in golds_list):
        raise TypeError("golds_list needs one list of gold answers per prediction, not strings")
    if len(predictions) != len(golds_list):
        raise ValueError(
            f"{len(predictions)} predictions but {len(golds_list)} gold-answer lists; "
            "pass one list of gold answers per prediction"
        )
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "recall": 0.0, "n": 0}
    pairs = list(zip(predictions, golds_list))
    return {
        "em": sum(best_em(p, g) for p, g in pairs) / n,
        "f1": sum(best_f1(p, g) for p, g in pairs) / n,
        "recall": sum(best_recall(p, g) for p, g in pairs) / n,
        "n": n,
    }
