import pytest

from adaptation.metrics import (
    best_em,
    best_f1,
    best_recall,
    exact_match,
    f1,
    first_sentence,
    normalize_answer,
    recall,
    score,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("theatre thereafter", "theatre thereafter"),  # articles only as whole words
        ("  U.S.\tArmy\n", "us army"),
        ("a the an", ""),
    ],
)
def test_normalisation(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match_is_strict_after_normalisation() -> None:
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    # The CaMeLS reference counted a prefix as a match; standard EM does not.
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0


def test_f1_hand_worked() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down].
    # common = 2, precision = 2/2 = 1, recall = 2/3, F1 = 2*1*(2/3) / (1 + 2/3) = 0.8.
    assert f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # Repeated tokens count once per gold occurrence: [cat, cat] vs [cat] -> common 1,
    # precision 1/2, recall 1, F1 = 2*(1/2)*1 / (3/2) = 2/3.
    assert f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1("dog", "cat") == 0.0


def test_f1_empty_answers() -> None:
    assert f1("the", "a") == 1.0  # both normalise to nothing
    assert f1("", "") == 1.0
    assert f1("", "Paris") == 0.0
    assert f1("Paris", "") == 0.0


def test_best_takes_the_max_over_gold_answers() -> None:
    golds = ["Marrow Bay", "Bay of Marrow"]
    # "marrow" vs "marrow bay": P=1, R=1/2 -> 2/3; vs "bay of marrow": P=1, R=1/3 -> 1/2.
    assert best_f1("marrow", golds) == pytest.approx(2 / 3)
    assert best_em("marrow", golds) == 0.0
    assert best_em("bay of marrow", golds) == 1.0
    # No gold answers means unanswerable: only an empty prediction is right.
    assert best_em("", []) == 1.0
    assert best_f1("Paris", []) == 0.0


def test_score_means_over_questions() -> None:
    preds = ["Marrow Bay", "born 1961", "Paris"]
    golds = [["marrow bay"], ["1961", "in 1961"], ["London"]]
    # EM: 1, 0, 0 -> 1/3. F1: 1; "born 1961" vs "1961" P=1/2 R=1 -> 2/3 (the other gold, after
    # normalisation "in 1961", gives P=R=1/2 -> 1/2); 0 -> mean (1 + 2/3 + 0)/3 = 5/9.
    out = score(preds, golds)
    assert out["n"] == 3
    assert out["em"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(5 / 9)
    # Recall: 1; "born 1961" holds all of "1961" -> 1; 0 -> 2/3.
    assert out["recall"] == pytest.approx(2 / 3)
    assert score([], []) == {"em": 0.0, "f1": 0.0, "recall": 0.0, "n": 0}


def test_first_sentence_ends_at_a_stop_before_whitespace_or_at_a_line_break() -> None:
    assert first_sentence("Alda Venn was born in Marrow Bay. She moved.") == (
        "Alda Venn was born in Marrow Bay."
    )
    assert first_sentence("It cost 3.5 million! Then more") == "It cost 3.5 million!"
    assert first_sentence("  Marrow Bay\nQuestion: next") == "Marrow Bay"
    assert first_sentence("Is it? Yes.") == "Is it?"
    assert first_sentence("no stop at all") == "no stop at all"


def test_recall_counts_gold_tokens_in_the_first_sentence_only() -> None:
    sentence = "Alda Venn was born in Marrow Bay in 1961."
    # Gold [marrow, bay]: both in the sentence -> 1, where F1 pays for the 7 other words:
    # P = 2/9, R = 1 -> 2 * (2/9) / (11/9) = 4/11.
    assert recall(sentence, "Marrow Bay") == 1.0
    assert f1(sentence, "Marrow Bay") == pytest.approx(4 / 11)
    # Gold [marrow, bay, harbour]: 2 of 3.
    assert recall(sentence, "Marrow Bay harbour") == pytest.approx(2 / 3)
    # A gold token only in the second sentence does not count.
    assert recall("She was born in 1961. It was in Marrow Bay.", "Marrow Bay") == 0.0
    # A gold token repeated counts as often as the prediction has it: [bay, bay] vs [bay].
    assert recall("Bay.", "Bay bay") == pytest.approx(1 / 2)
    assert recall("", "Paris") == 0.0
    assert recall("", "") == 1.0 and recall("Paris", "the") == 0.0


def test_best_recall_takes_the_max_over_gold_answers() -> None:
    golds = ["Marrow Bay harbour", "Quillon Works"]
    # 2/3 of the first, 1/2 of the second ("Quillon").
    assert best_recall("Marrow Bay, near Quillon.", golds) == pytest.approx(2 / 3)
    assert best_recall("Paris", []) == 0.0


def test_score_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="one list of gold answers"):
        score(["Paris"], ["Paris"])
