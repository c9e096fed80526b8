import pytest

from adaptation.lab.evaluation import relevant
from adaptation.retrieval import Retriever, as_context, load_encoder

DOCS = [
    ("venn", "Alda Venn was born in Marrow Bay and works for Quillon Works as an engineer."),
    ("selka", "The weather in Port Selka stayed mild through March, residents said."),
    ("bowl", "Super Bowl 50 was an American football game played on February 7, 2016."),
    ("bread", "A sourdough loaf needs flour, water, salt and a lively starter."),
]


@pytest.fixture(scope="module")
def retriever() -> Retriever:
    r = Retriever()
    r.add_many(DOCS[:3])
    r.add(*DOCS[3])
    return r


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("Where was Alda Venn born?", "venn"),
        ("What was the weather like in Port Selka?", "selka"),
        ("When was Super Bowl 50 played?", "bowl"),
        ("How do I bake bread?", "bread"),
    ],
)
def test_the_document_naming_the_subject_ranks_first(
    retriever: Retriever, query: str, best: str
) -> None:
    hits = retriever.search(query, k=4)
    assert [h[0] for h in hits][0] == best
    scores = [h[2] for h in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 4
    assert hits[0][1] == dict(DOCS)[best]
    assert -1.0 <= scores[-1] < scores[0] <= 1.0 + 1e-5


def test_embeddings_are_unit_vectors_and_scores_are_cosines(retriever: Retriever) -> None:
    hit = retriever.search(DOCS[0][1], k=1)[0]
    assert hit[0] == "venn" and hit[2] == pytest.approx(1.0, abs=1e-4)
    assert load_encoder("cpu") is load_encoder("cpu")  # one encoder per process


def test_k_and_replacement() -> None:
    r = Retriever()
    assert r.search("anything") == []
    r.add("a", "Marrow Bay is a harbour town.")
    r.add("b", "Quillon Works builds engines.")
    assert len(r.search("harbour", k=10)) == 2
    r.add("a", "Zebras graze on the savanna.")  # re-adding an id replaces its text
    assert len(r) == 2 and "a" in r
    assert r.search("zebra", k=1)[0][:2] == ("a", "Zebras graze on the savanna.")
    assert as_context(r.search("engines", k=2)).split("\n") == [
        "Quillon Works builds engines.",
        "Zebras graze on the savanna.",
    ]
    with pytest.raises(ValueError, match="k must be at least 1"):
        r.search("x", k=0)


def test_a_similarity_floor_finds_nothing_for_a_question_about_nothing_stored(
    retriever: Retriever,
) -> None:
    assert [h[0] for h in relevant(retriever, "Where was Alda Venn born?", 3, 0.3)] == ["venn"]
    assert relevant(retriever, "What is the tallest mountain in Nepal?", 3, 0.3) == []
    assert len(relevant(retriever, "What is the tallest mountain in Nepal?", 3, -1.0)) == 3
