from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adaptation.best_of_k import answer_nll
from adaptation.data import Document, read_documents
from adaptation.lab.conflicts import (
    ConflictConfig,
    ConflictItem,
    answer_outcomes,
    build_conflicts,
    conflict_items,
    fresh_world,
    trusted_win_rate,
    write_conflicts,
)
from adaptation.lab.world import World, WorldConfig
from adaptation.modeling import LoraSettings, attach_lora, load_base
from adaptation.trust import SourceTrust, apply_trusted
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting import UniformWeighter, encode_weighted

SMALL = WorldConfig(seed=0, filler_range=(0, 1))


def _pairs(docs: list[Document]) -> dict[str, dict[str, Document]]:
    pairs: dict[str, dict[str, Document]] = {}
    for d in docs:
        if d.meta["conflict"]:
            pairs.setdefault(d.id.rsplit("-", 1)[0], {})[d.id[-1]] = d
    return pairs


def test_conflicting_and_plain_facts_from_both_sources(tmp_path: Path) -> None:
    cfg = ConflictConfig(people=40, conflict_fraction=0.5)
    docs = build_conflicts(World(SMALL), cfg)
    assert docs == build_conflicts(World(SMALL), cfg)
    assert docs != build_conflicts(World(SMALL.replace(seed=1)), cfg)
    assert [d.time for d in docs] == sorted(d.time for d in docs)
    pairs = _pairs(docs)
    assert len(pairs) == 20
    for pair in pairs.values():
        r, u = pair["r"], pair["u"]
        assert (r.source, u.source) == ("reliable", "unreliable")
        good, bad = r.meta["reliable_value"], r.meta["unreliable_value"]
        assert good != bad and good in r.text and bad in u.text and bad not in r.text
        assert [q.answers for q in r.questions] == [(good,)] and u.questions == ()
    first = [docs.index(p["r"]) < docs.index(p["u"]) for p in pairs.values()]
    assert 0 < sum(first) < len(first), "pair order must vary, or recency would pick a winner"
    plain = [d for d in docs if not d.meta["conflict"]]
    assert len(plain) == 20 and {d.source for d in plain} == {"reliable", "unreliable"}
    assert all(d.questions and d.questions[0].answers[0] in d.text for d in plain)
    assert len(conflict_items(docs)) == 20
    path = write_conflicts(tmp_path, SMALL, cfg)
    assert path.name == "conflicts.jsonl"
    assert read_documents(path) == build_conflicts(fresh_world(SMALL), cfg)


def test_an_article_never_names_the_other_sources_place_in_passing() -> None:
    """Filler draws random places; one naming the rival value would teach it under the wrong
    source. (Years are not checked: filler numbers are free to look like any year.)"""
    cfg = ConflictConfig(people=400, conflict_fraction=1.0)
    places = 0
    for pair in _pairs(build_conflicts(World(WorldConfig(seed=0)), cfg)).values():
        r, u = pair["r"], pair["u"]
        if r.meta["relations"][0] in ("birthplace", "residence"):
            places += 1
            assert r.meta["reliable_value"] not in u.text
            assert r.meta["unreliable_value"] not in r.text
    assert places > 100


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="conflict_fraction"):
        ConflictConfig(conflict_fraction=1.5)
    with pytest.raises(ValueError, match="different names"):
        ConflictConfig(reliable="a", unreliable="a")


def _learn(model_dir: Path, docs: list[Document], trust: SourceTrust):
    torch.manual_seed(0)
    model, tok = load_base(model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=8))
    updater = OnlineUpdater(peft, UpdateConfig(lr=1e-2, steps_per_doc=10))
    for d in docs:
        doc = encode_weighted(d.text, tok, UniformWeighter())
        apply_trusted(updater, [doc], trust.update_scale(d.source))
    return peft, tok


def _trusted_margin(model_dir: Path, trust: SourceTrust, seed: int) -> float:
    """NLL(unreliable value) - NLL(reliable value) after learning one conflicting pair, the
    reliable article first (so recency favours the unreliable one).

    A tiny random model prefers some strings to others before it learns anything; running the
    pair a second time with the two articles' sources swapped and averaging cancels that prior.
    """
    world = World(SMALL.replace(seed=seed, filler_range=(0, 0)))
    docs = build_conflicts(world, ConflictConfig(people=1, conflict_fraction=1.0))
    r = next(d for d in docs if d.source == "reliable")
    u = next(d for d in docs if d.source == "unreliable")
    (item,) = conflict_items(docs)
    margins = []
    for first, second, good, bad in (
        (r, u, item.reliable, item.unreliable),
        (
            replace(u, source="reliable"),
            replace(r, source="unreliable"),
            item.unreliable,
            item.reliable,
        ),
    ):
        model, tok = _learn(model_dir, [first, second], trust)
        nll_good, nll_bad = answer_nll(model, tok, [(item.question, good), (item.question, bad)])
        margins.append(nll_bad - nll_good)
    return sum(margins) / 2


def test_trusted_source_wins_a_conflict_even_when_it_came_first(tiny_model_dir: Path) -> None:
    for seed in range(2):
        assert _trusted_margin(tiny_model_dir, SourceTrust({"unreliable": 0.2}), seed) > 0, seed
        reversed_trust = SourceTrust({"reliable": 0.2})
        assert _trusted_margin(tiny_model_dir, reversed_trust, seed) < 0, "trust decides, not names"


def test_plain_facts_from_a_distrusted_source_are_still_learned(tiny_model_dir: Path) -> None:
    docs = build_conflicts(World(SMALL), ConflictConfig(people=2, conflict_fraction=0.0))
    doc = next(d for d in docs if d.source == "unreliable")
    pair = [(doc.questions[0].question, doc.questions[0].answers[0])]
    model, tok = load_base(tiny_model_dir, device="cpu")
    before = answer_nll(model, tok, pair)[0]
    model, tok = _learn(tiny_model_dir, [doc], SourceTrust({"unreliable": 0.2}))
    assert answer_nll(model, tok, pair)[0] < before


def test_answer_outcomes_count_which_value_the_answer_matches() -> None:
    items = [ConflictItem("q", "Marrow Bay", "Port Selka")] * 4
    out = answer_outcomes(["Marrow Bay", "Port Selka", "port selka.", "Quillon"], items)
    assert out == {"trusted": 0.25, "untrusted": 0.5, "neither": 0.25, "n": 4}
    with pytest.raises(ValueError, match="predictions"):
        answer_outcomes(["x"], items)


def test_trusted_win_rate_compares_the_two_values(tiny_model_dir: Path) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    items = [ConflictItem("Where was Alda Venn born?", "Marrow Bay", "Port Selka")]
    swapped = [ConflictItem(c.question, c.unreliable, c.reliable) for c in items]
    nll = answer_nll(model, tok, [(items[0].question, v) for v in ("Marrow Bay", "Port Selka")])
    assert trusted_win_rate(model, tok, items) == float(nll[0] < nll[1])
    assert trusted_win_rate(model, tok, items) + trusted_win_rate(model, tok, swapped) == 1.0
    with pytest.raises(ValueError, match="no contested"):
        trusted_win_rate(model, tok, [])
