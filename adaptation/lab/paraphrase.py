"""A template paraphraser for knowledge-world documents: the stand-in for a capable self-edit model.

It finds the fact sentences of an article by matching the world's own templates, then restates
each fact with the relation's other templates and as self-QA lines in the QA prompt's format.
It writes facts only, never filler, and is deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from adaptation.data import Document
from adaptation.lab.world import CHANGE_TEMPLATES, ORG_FACTS, PERSON_FACTS
from adaptation.prompts import qa_text

FACTS: dict[str, tuple[list[str], list[str]]] = {**PERSON_FACTS, **ORG_FACTS}
_VALUE_PATTERNS = {"birth_year": r"\d{4}", "founded": r"\d{4}", "role": r"[a-z]+"}
_NAME_PATTERN = r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)*"
_PRONOUNS = {"him": "his", "her": "her", "them": "their"}
_FIELD_PATTERNS = {
    "pos": "(?P<pos>his|her|their)",
    "pro": "(?P<pro>him|her|them)",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_AN = re.compile(r"\ban ([aeiou])")
_A = re.compile(r"\ba ([aeiou])")


@dataclass(frozen=True)
class Fact:
    """One fact sentence: the relation, its (current) value, the old value for a change."""

    relation: str
    value: str
    template: str
    old: str | None = None
    possessive: str | None = None


@lru_cache(maxsize=8192)
def _pattern(template: str, relation: str, entity: str) -> re.Pattern[str]:
    value = _VALUE_PATTERNS.get(relation, _NAME_PATTERN)
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name == "name":
            parts.append(re.escape(entity))
        elif name == "value":
            parts.append(f"(?P<value>{value})")
        elif name == "old":
            parts.append(f"(?P<old>{value})")
        elif name is not None:
            parts.append(_FIELD_PATTERNS[name])
    return re.compile("".join(parts))


def _templates() -> Iterator[tuple[str, str, bool]]:
    """(relation, template, is_change), changes first: a change sentence also names a value."""
    for relation, templates in CHANGE_TEMPLATES.items():
        for t in templates:
            yield relation, t, True
    for relation, (templates, _) in FACTS.items():
        for t in templates:
            yield relation, t, False


def entity_of(doc: Document) -> str:
    entity = doc.meta.get("entity") or doc.title
    if not entity:
        raise ValueError(
            f"document {doc.id!r} names no entity: the paraphraser needs meta['entity'] or a title"
        )
    return str(entity)


def extract_facts(doc: Document) -> list[Fact]:
    """The fact sentences of a world article, in order of appearance."""
    entity = entity_of(doc)
    facts: list[Fact] = []
    for sentence in _SENTENCE_END.split(doc.text):
        plain = _AN.sub(r"a \1", sentence.strip())
        for relation, template, is_change in _templates():
            m = _pattern(template, relation, entity).fullmatch(plain)
            if m is None:
                continue
            groups = m.groupdict()
            possessive = groups.get("pos") or _PRONOUNS.get(groups.get("pro") or "")
            old = groups.get("old") if is_change else None
            facts.append(Fact(relation, groups["value"], template, old, possessive))
            break
    return facts


def _render(template: str, entity: str, fact: Fact, possessive: str) -> str:
    pronoun = {v: k for k, v in _PRONOUNS.items()}[possessive]
    text = template.format(name=entity, value=fact.value, old=fact.old, pos=possessive, pro=pronoun)
    return _A.sub(r"an \1", text)


def _usable(template: str, fact: Fact, possessive: str | None) -> bool:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    return template != fact.template and (possessive is not None or not fields & {"pos", "pro"})


def _pick(options: Sequence[str], rng: random.Random, i: int) -> str:
    """Edit i takes the option i places after a random start, so k edits differ while k allows."""
    return options[(rng.randrange(len(options)) + i) % len(options)]


def _statements(
    fact: Fact, entity: str, possessive: str | None, rng: random.Random, i: int, qa: bool
) -> list[str]:
    """The current value restated (a change also as a change) and, with `qa`, asked once."""
    pools = [FACTS[fact.relation][0]]
    if fact.old is not None:
        pools.insert(0, CHANGE_TEMPLATES[fact.relation])
    out = []
    for pool in pools:
        options = [t for t in pool if _usable(t, fact, possessive)]
        if options:
            out.append(_render(_pick(options, rng, i), entity, fact, possessive or "their"))
    if qa:
        question = _pick(FACTS[fact.relation][1], rng, i).format(name=entity)
        out.append(qa_text(question, fact.value))
    return out


def paraphrase(doc: Document, k: int = 1, seed: int = 0, qa: bool = True) -> list[str]:
    """k self-edits for a world article, each one generation-like text of facts separated by
    blank lines (so `parse_self_edits` splits it back into one sequence per statement).

    Each fact is restated with another template of its relation and, with `qa`, asked and
    answered once; the k edits use different templates as far as there are enough. An article
    without recognisable facts gets no edits.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    entity = entity_of(doc)
    facts = extract_facts(doc)
    if not facts:
        return []
    possessive = next((f.possessive for f in facts if f.possessive), None)
    edits = []
    for i in range(k):
        rng = random.Random(f"{seed}:{doc.id}")
        lines = [s for f in facts for s in _statements(f, entity, possessive, rng, i, qa)]
        edits.append("\n\n".join(lines))
    return edits


def with_paraphrases(docs: Sequence[Document], k: int = 1, seed: int = 0) -> list[Document]:
    """The documents with their `self_edits` set to the paraphraser's output."""
    return [dataclasses.replace(d, self_edits=tuple(paraphrase(d, k, seed))) for d in docs]
