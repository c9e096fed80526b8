import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from adaptation.data import QA
from adaptation.lab.best_of_k import answer_nll, best_of_k, correlation, probe_score
from adaptation.modeling import LoraSettings, attach_lora, load_base
from adaptation.self_edit import apply_with_self_edits
from adaptation.updater import OnlineUpdater, StepReport, UpdateConfig
from adaptation.weighting import UniformWeighter

PROBE = QA("Where was Alda Venn born?", ("Marrow Bay",))
OFF_TOPIC = ["The weather in Port Selka stayed mild on Tuesday.", "Super Bowl 50 was a game."]
ON_TOPIC = [
    "Question: Where was Alda Venn born?\nAnswer: Marrow Bay",
    "Alda Venn was born in Marrow Bay.",
]


def _updater(model_dir: Path) -> tuple[OnlineUpdater, object]:
    torch.manual_seed(0)
    model, tok = load_base(model_dir, device="cpu")
    updater = OnlineUpdater(
        attach_lora(model, LoraSettings(rank=4)), UpdateConfig(lr=1e-2, steps_per_doc=5)
    )
    # a stream already under way: the shared starting state is not the fresh adapter
    apply_with_self_edits(updater, tok, UniformWeighter(), ["Quillon Works hired an engineer."])
    return updater, tok


def _trainings(
    updater: OnlineUpdater, tok: object, *candidates: list[str]
) -> list[Callable[[], list[StepReport]]]:
    """Each candidate as best-of-k takes it: a call that trains its sequences."""
    return [
        partial(apply_with_self_edits, updater, tok, UniformWeighter(), sequences)
        for sequences in candidates
    ]


def test_best_of_k_keeps_the_candidate_that_answers_the_probes(tiny_model_dir: Path) -> None:
    updater, tok = _updater(tiny_model_dir)
    start = [p.detach().clone() for p in updater.params]
    result = best_of_k(
        updater,
        tok,
        _trainings(updater, tok, OFF_TOPIC, ON_TOPIC, OFF_TOPIC),
        probes=[PROBE],
        gold=[PROBE],
        scoring="nll",
    )
    assert result.chosen == 1
    assert result.probe[1].nll < result.probe[0].nll
    assert result.probe[0].nll == pytest.approx(result.probe[2].nll, rel=1e-4), "same start"
    assert [s.nll for s in result.gold] == [s.nll for s in result.probe]
    assert all(len(r) == 5 and all(s.applied for s in r) for r in result.results)
    # the model is left in the chosen candidate's state
    assert probe_score(updater.model, tok, [PROBE]).nll == pytest.approx(result.probe[1].nll)
    assert any(not torch.equal(p, s) for p, s in zip(updater.params, start))


def test_candidates_start_from_the_same_state(tiny_model_dir: Path) -> None:
    updater, tok = _updater(tiny_model_dir)
    result = best_of_k(updater, tok, _trainings(updater, tok, ON_TOPIC, OFF_TOPIC), probes=[PROBE])
    alone, tok = _updater(tiny_model_dir)
    apply_with_self_edits(alone, tok, UniformWeighter(), OFF_TOPIC)
    assert probe_score(alone.model, tok, [PROBE]).nll == pytest.approx(
        result.probe[1].nll, rel=1e-4
    )
    with pytest.raises(ValueError, match="candidate"):
        best_of_k(updater, tok, [], probes=[PROBE])
    with pytest.raises(ValueError, match="answer"):
        best_of_k(updater, tok, _trainings(updater, tok, ON_TOPIC), probes=[QA("Why?", ())])


def test_only_the_kept_candidate_counts_in_the_updaters_record(tiny_model_dir: Path) -> None:
    """The losers' steps are undone, so they must not count as applied nor set the yardstick the
    explosion check holds the next document to."""
    updater, tok = _updater(tiny_model_dir)
    applied, recent = updater.steps_applied, updater.state_dict()["recent"]
    result = best_of_k(
        updater, tok, _trainings(updater, tok, OFF_TOPIC, ON_TOPIC, OFF_TOPIC), probes=[PROBE]
    )
    kept = result.results[result.chosen]
    assert updater.steps_applied == applied + len(kept)
    assert updater.state_dict()["recent"] == [*recent, kept[0].loss]


def test_answer_nll_scores_each_pair_alone(tiny_model_dir: Path) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    pairs = [("Where was Alda Venn born?", "Marrow Bay"), ("Who?", "Quillon Works as an engineer")]
    batched = answer_nll(model, tok, pairs)
    assert batched == pytest.approx([answer_nll(model, tok, [p])[0] for p in pairs], rel=1e-5)
    assert all(v > 0 for v in batched)


def test_correlation() -> None:
    assert correlation([1, 2, 3, 4], [2, 4, 6, 8]) == {
        "pearson": pytest.approx(1.0),
        "spearman": 1.0,
        "n": 4,
    }
    c = correlation([1, 2, 3, 4], [1, 8, 27, 1000])
    assert c["spearman"] == pytest.approx(1.0) and c["pearson"] < 0.9
    assert correlation([3, 2, 1], [1, 2, 3])["spearman"] == pytest.approx(-1.0)
    # ties share their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert correlation([0, 0, 1], [1, 2, 3])["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3])["pearson"])
    assert math.isnan(correlation([1], [1])["spearman"])
    with pytest.raises(ValueError, match="as many"):
        correlation([1, 2], [1])
