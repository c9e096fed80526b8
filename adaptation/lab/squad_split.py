"""The SQuAD split by title for measuring a real base (lab code: the service never imports it).

A stream file's first N passages are what an evaluation learns. Every SQuAD dev passage whose title
none of them carries is never streamed; those titles, sorted, are dealt in turn to three sets, so
each set is split from the stream and from the others by title:
- `retention.jsonl`: questions the base already answers closed-book (the gold answer's tokens in
  its answer's first sentence, recall at least a threshold), which learning the stream must not
  make it forget;
- `reading.jsonl`: passages whose questions are asked with the passage in context, which says
  whether the model still reads;
- `tuning.jsonl`: passages held out of every evaluation, for choosing prompts and for training
  learned parts.
`split.json` writes the split down.

An instruct model answers in sentences, so a question it answers rightly scores an F1 near 0.3
("The capital of France is Paris." against "Paris"): recall, not F1, tells that it knows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from adaptation.answering import SCORED_ANSWER_TOKENS, generate_answers
from adaptation.data import Document, read_documents, write_documents
from adaptation.metrics import best_recall
from adaptation.modeling import load_base


def unstreamed_titles(pool: Sequence[Document], streamed: Sequence[Document]) -> list[str]:
    taken = {d.title for d in streamed}
    return sorted({d.title for d in pool if d.title and d.title not in taken})


def spread(pool: Sequence[Document], titles: Sequence[str]) -> list[Document]:
    """The titles' passages round-robin over the titles, so any head of the list spans them."""
    by_title: dict[str, list[Document]] = {t: [] for t in titles}
    for d in pool:
        if d.title in by_title:
            by_title[d.title].append(d)
    depth = max((len(v) for v in by_title.values()), default=0)
    return [v[i] for i in range(depth) for v in by_title.values() if i < len(v)]


def known_questions(
    answer: Callable[[list[str]], list[str]],
    docs: Sequence[Document],
    threshold: float,
    keep: int,
    batch: int = 32,
) -> list[Document]:
    """The documents cut to the questions answered closed-book at recall >= threshold, until
    `keep` questions are found."""
    out: list[Document] = []
    found = 0
    bar = tqdm(total=keep, desc="known questions", unit="q")
    for doc in docs:
        questions = list(doc.questions)
        kept = []
        for start in range(0, len(questions), batch):
            chunk = questions[start : start + batch]
            preds = answer([q.question for q in chunk])
            kept += [
                q
                for q, p in zip(chunk, preds, strict=True)
                if best_recall(p, q.answers) >= threshold
            ]
        if kept:
            out.append(replace(doc, questions=tuple(kept[: keep - found])))
            found += len(out[-1].questions)
            bar.update(len(out[-1].questions))
        if found >= keep:
            break
    bar.close()
    return out


def build_split(
    squad: str | os.PathLike[str],
    stream: str | os.PathLike[str],
    stream_limit: int,
    model: str,
    out_dir: str | os.PathLike[str],
    threshold: float = 1.0,
    retention_questions: int = 80,
    reading_passages: int = 20,
    max_new_tokens: int = SCORED_ANSWER_TOKENS,
) -> dict:
    """Write retention.jsonl, reading.jsonl, tuning.jsonl and split.json under `out_dir`."""
    streamed = read_documents(stream, stream_limit)
    pool = read_documents(squad)
    titles = unstreamed_titles(pool, streamed)
    retention_titles, reading_titles, tuning_titles = titles[0::3], titles[1::3], titles[2::3]
    base, tokenizer = load_base(model)

    def answer(questions: list[str]) -> list[str]:
        return generate_answers(base, tokenizer, questions, max_new_tokens=max_new_tokens)

    candidates = [d for d in pool if d.title in retention_titles]
    retention = known_questions(answer, candidates, threshold, retention_questions)
    reading = spread(pool, reading_titles)[:reading_passages]
    out = Path(out_dir)
    write_documents(out / "retention.jsonl", retention)
    write_documents(out / "reading.jsonl", reading)
    write_documents(out / "tuning.jsonl", spread(pool, tuning_titles))
    record = {
        "squad": str(squad),
        "stream": str(stream),
        "stream_limit": stream_limit,
        "model": model,
        "threshold_recall": threshold,
        "streamed_titles": sorted({d.title for d in streamed if d.title}),
        "retention_titles": retention_titles,
        "reading_titles": reading_titles,
        "tuning_titles": tuning_titles,
        "retention_questions": sum(len(d.questions) for d in retention),
        "retention_passages_scanned": len(candidates),
        "reading_passages": len(reading),
        "reading_questions": sum(len(d.questions) for d in reading),
    }
    (out / "split.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
