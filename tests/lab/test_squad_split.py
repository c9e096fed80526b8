"""The SQuAD split for a real base: titles apart from the stream, and only known questions kept."""

from __future__ import annotations

from adaptation.data import QA, Document
from adaptation.lab.squad_split import known_questions, spread, unstreamed_titles


def doc(title: str, *questions: tuple[str, str]) -> Document:
    return Document(
        id=f"{title}-{len(questions)}",
        text=f"About {title}.",
        title=title,
        questions=tuple(QA(q, (a,)) for q, a in questions),
    )


def test_titles_of_the_stream_are_never_in_a_retention_set() -> None:
    streamed = [doc("Rhine"), doc("Oxygen")]
    pool = [doc("Rhine"), doc("Warsaw"), doc("Kenya"), doc("Oxygen"), doc("Kenya", ("Q?", "A"))]
    assert unstreamed_titles(pool, streamed) == ["Kenya", "Warsaw"]
    assert [d.id for d in spread(pool, ["Kenya", "Warsaw"])] == ["Kenya-0", "Warsaw-0", "Kenya-1"]


def test_only_questions_answered_at_the_threshold_are_kept_until_enough() -> None:
    answers = {"Capital of Kenya?": "The capital is Nairobi.", "River?": "The Rhine river."}
    docs = [
        doc("Kenya", ("Capital of Kenya?", "Nairobi"), ("River?", "Tana River")),
        doc("Warsaw", ("Capital of Kenya?", "Nairobi")),
        doc("Rhine", ("Capital of Kenya?", "Nairobi")),
    ]

    def answer(questions: list[str]) -> list[str]:
        return [answers[q] for q in questions]

    kept = known_questions(answer, docs, threshold=1.0, keep=2, batch=1)
    assert [d.title for d in kept] == ["Kenya", "Warsaw"]
    assert [q.question for d in kept for q in d.questions] == ["Capital of Kenya?"] * 2
    assert len(known_questions(answer, docs, threshold=0.5, keep=9)[0].questions) == 2
