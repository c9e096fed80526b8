"""One dataset format everywhere: documents with the questions they answer.

Reads the project's JSONL (one document per line) and the SQuAD-style JSON lists in
`shared/data/` (title/context/questions), so every command takes either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QA:
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str | None = None
    time: str | None = None
    title: str | None = None
    questions: tuple[QA, ...] = ()
    self_edits: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text}
        for key in ("source", "time", "title"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["questions"] = [
            {"question": q.question, "answers": list(q.answers)} for q in self.questions
        ]
        if self.self_edits:
            out["self_edits"] = list(self.self_edits)
        if self.meta:
            out["meta"] = self.meta
        return out


def content_id(text: str, namespace: str = "default") -> str:
    """A stable id from content, so a resubmitted document maps to the same id."""
    return hashlib.sha256(f"{namespace}\0{text}".encode()).hexdigest()[:24]


def _qa(raw: dict[str, Any]) -> QA:
    answers = raw.get("answers", raw.get("answer", []))
    if isinstance(answers, str):
        answers = [answers]
    answers = [a["text"] if isinstance(a, dict) else str(a) for a in answers]
    return QA(question=str(raw["question"]), answers=tuple(answers))


def document_from_json(raw: dict[str, Any]) -> Document:
    """Accept both the JSONL record and a SQuAD-style {title, context, questions} object."""
    text = raw.get("text", raw.get("context"))
    if not isinstance(text, str):
        raise ValueError("a document needs a 'text' (or SQuAD 'context') string")
    edits = raw.get("self_edits", raw.get("completions", ()))
    return Document(
        id=str(raw.get("id") or content_id(text)),
        text=text,
        source=raw.get("source"),
        time=raw.get("time"),
        title=raw.get("title"),
        questions=tuple(_qa(q) for q in raw.get("questions", ())),
        self_edits=tuple(str(e) for e in edits),
        meta=dict(raw.get("meta", {})),
    )


def read_documents(path: str | os.PathLike[str], limit: int | None = None) -> list[Document]:
    """Read JSONL or a JSON list; `limit` keeps the first N documents."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no dataset at {p}")
    docs = list(_iter_raw(p))
    if limit is not None:
        docs = docs[:limit]
    return [document_from_json(r) for r in docs]


def _iter_raw(p: Path) -> Iterator[dict[str, Any]]:
    with p.open(encoding="utf-8") as fh:
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
        fh.seek(0)
        if head == "[":
            yield from json.load(fh)
            return
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{n}: not valid JSON ({exc.msg})") from exc


def write_documents(path: str | os.PathLike[str], docs: Iterable[Document]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")


def all_questions(docs: Iterable[Document]) -> list[QA]:
    return [q for d in docs for q in d.questions]


__all__ = [
    "QA",
    "Document",
    "all_questions",
    "content_id",
    "document_from_json",
    "read_documents",
    "write_documents",
]
