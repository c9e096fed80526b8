"""Salient spans: a rule-based stand-in for named entities, numbers and dates.

The CaMeLS baseline puts all the loss on the spans that carry facts. No NER model is available
offline, so capitalisation and digits serve: a capitalised word is a name unless it merely starts
a sentence (a lone "Smith" there is lost), while a run of capitalised words ("Alda Venn", "Super
Bowl") is a name wherever it stands. Function words capitalised by position ("The", "In",
"Where") never count. The whitespace inside a multi-word span carries its weight too, so a
tokenizer that glues the space to the next word still sees the whole span.
"""

from __future__ import annotations

import re

import numpy as np

_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?)"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
# "3 March 2011", "3 March", "March 3, 2011", "March 3", "March 2011".
_DATE = re.compile(
    rf"\b(?:{_DAY}\s+{_MONTH}(?:,?\s+\d{{4}})?"
    rf"|{_MONTH}\s+{_DAY}(?:,?\s+\d{{4}})?(?!\d)"
    rf"|{_MONTH}\s+\d{{4}})\b"
)
# 1961, 1,234, 3.5, 21st; a trailing full stop is punctuation, not a decimal point.
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:st|nd|rd|th)?")
_WORD = re.compile(r"[^\W\d_](?:[\w'’-]*\w)?")
_PRONOUN_I = re.compile(r"I(?:['’][a-z]+)?")
_SENTENCE_END = ".!?"
_OPENERS = "\"'“‘([{"
_CLOSERS = "\"'”’)]}"
# Words capitalised by their position (sentence start, after a colon), not because they name.
_FUNCTION_WORDS = frozenset(
    word
    for group in (
        "A An The This That These Those",
        "In On At By For From Of To With As After Before During Since Until",
        "And But Or So If When While Where Who Whom Whose What Which Why How",
        "It Its He She They We You His Her Their Our My Your There Then Here",
        "However Also Although Though",
    )
    for word in group.split()
)


def _starts_sentence(text: str, pos: int) -> bool:
    """True at the text's start, after a line break, or after sentence-ending punctuation + space."""
    i = pos - 1
    while i >= 0 and text[i] in _OPENERS:
        i -= 1
    j = i
    while j >= 0 and text[j].isspace():
        if text[j] == "\n":
            return True
        j -= 1
    if j < 0:
        return True
    if j == i:  # no space before the word: "U.S." continues, it does not start anything
        return False
    while j >= 0 and text[j] in _CLOSERS:
        j -= 1
    return j >= 0 and text[j] in _SENTENCE_END


def _capitalised_runs(text: str) -> list[list[tuple[int, int]]]:
    """Word spans of each run of capitalised words joined by spaces on one line."""
    runs: list[list[tuple[int, int]]] = []
    for m in _WORD.finditer(text):
        word = m.group()
        if not word[0].isupper() or _PRONOUN_I.fullmatch(word):
            continue
        gap = text[runs[-1][-1][1] : m.start()] if runs else ""
        if gap.isspace() and "\n" not in gap:
            runs[-1].append(m.span())
        else:
            runs.append([m.span()])
    return runs


def _name_span(text: str, run: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The part of a capitalised run that is a name, if any.

    Leading function words are capitalised only by position ("In Paris", "The weather",
    "Question: Where"), so they are dropped; a lone word left standing at a sentence start is
    capitalised by position too, and is no name.
    """
    first = 0
    while first < len(run) and text[run[first][0] : run[first][1]] in _FUNCTION_WORDS:
        first += 1
    if first == len(run):
        return None
    if first == 0 and len(run) == 1 and _starts_sentence(text, run[0][0]):
        return None
    return run[first][0], run[-1][1]


class SalientWeighter:
    """Weight 1 on names, numbers and dates, 0 elsewhere."""

    name = "salient"

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) judged salient, in order, possibly overlapping."""
        found = [span for run in _capitalised_runs(text) if (span := _name_span(text, run))]
        found += [m.span() for m in _NUMBER.finditer(text)]
        found += [m.span() for m in _DATE.finditer(text)]
        return sorted(found)

    def char_weights(self, text: str) -> np.ndarray:
        weights = np.zeros(len(text), dtype=np.float32)
        for start, end in self.spans(text):
            weights[start:end] = 1.0
        return weights
