from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

from adaptation.best_of_k import (
    ProbeWriting,
    answer_nll,
    best_of_k,
    learn_best_of,
    learn_written_best_of,
    parse_questions,
    probe_score,
    write_probes,
)
from adaptation.data import QA, Document
from adaptation.learner import Learner, LearnSettings, SelfEditWriting
from adaptation.modeling import LoraSettings, attach_lora, load_base, prepare_tokenizer
from adaptation.self_edit import apply_with_self_edits
from adaptation.updater import OnlineUpdater, StepReport, UpdateConfig
from adaptation.weighting import UniformWeighter

DOC = Document("d1", "Alda Venn was born in Marrow Bay in 1961.", title="Alda Venn")
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


def _state(updater: OnlineUpdater) -> list[torch.Tensor]:
    """The adapter's weights and every tensor of the optimizer's state, in order."""
    state = updater.optimizer.state_dict()["state"]
    moments = [t for i in sorted(state) for _, t in sorted(state[i].items())]
    return [p.detach() for p in updater.params] + moments


def _assert_same_state(a: OnlineUpdater, b: OnlineUpdater) -> None:
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b), strict=True))
    assert a.steps_applied == b.steps_applied
    assert a.state_dict()["recent"] == b.state_dict()["recent"]


def test_the_kept_state_is_the_winner_trained_alone_from_the_start(tiny_model_dir: Path) -> None:
    """Scoring the losers leaves no trace: adapter and optimizer are exactly where training the
    winner alone from the shared start leads."""
    updater, tok = _updater(tiny_model_dir)
    trainings = _trainings(updater, tok, OFF_TOPIC, ON_TOPIC, OFF_TOPIC)
    assert best_of_k(updater, tok, trainings, probes=[PROBE], scoring="nll").chosen == 1
    alone, tok = _updater(tiny_model_dir)
    apply_with_self_edits(alone, tok, UniformWeighter(), ON_TOPIC)
    _assert_same_state(updater, alone)


def _learner(model_dir: Path, write: SelfEditWriting | None = None) -> Learner:
    torch.manual_seed(0)
    model, tok = load_base(model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    update = UpdateConfig(lr=1e-2, steps_per_doc=3)
    return Learner(peft, tok, UniformWeighter(), update, LearnSettings(write=write))


def test_learn_best_of_keeps_the_winner_as_if_learned_alone(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    candidates = ["\n\n".join(OFF_TOPIC), "\n\n".join(ON_TOPIC), "\n\n".join(OFF_TOPIC)]
    result, choice = learn_best_of(learner, DOC, candidates, probes=[PROBE], scoring="nll")
    assert choice is not None and choice.chosen == 1 and result.applied
    assert result.note and "best of 3" in result.note
    alone = _learner(tiny_model_dir)
    alone.learn(replace(DOC, self_edits=(candidates[1],)))
    _assert_same_state(learner.updater, alone.updater)
    # one candidate, or no probe to choose by: learned with them all, as plain seal
    plain = _learner(tiny_model_dir)
    assert learn_best_of(plain, DOC, candidates[:1], probes=[PROBE])[1] is None
    assert learn_best_of(plain, DOC, candidates, probes=[])[1] is None


def test_written_best_of_replays_to_the_same_weights(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's path: k self-edits written by the bare base (seeded by the document id,
    cached), scored on the base's probes; a replay reaches the same weights from the cache."""
    monkeypatch.setattr("adaptation.best_of_k.write_probes", lambda *a, **k: [PROBE])
    write = SelfEditWriting(k=1, max_new_tokens=16, cache_dir=tmp_path)
    first = _learner(tiny_model_dir, write)
    assert learn_written_best_of(first, DOC, k=3).note.startswith("best of 3")
    assert len(list(tmp_path.rglob("*.json"))) == 1
    replay = _learner(tiny_model_dir, write)
    monkeypatch.setattr("adaptation.self_edit.sample_generations", None)  # no writing again
    learn_written_best_of(replay, DOC, k=3)
    _assert_same_state(first.updater, replay.updater)
    supplied = replace(DOC, self_edits=tuple(ON_TOPIC))
    assert learn_written_best_of(replay, supplied, k=3).note is None, "what was sent is learned"


GENERATED = """Here are three questions:
1. Where was Alda Venn born?
2) Q2: In what year was Alda Venn born? Answer: 1961
Question: Who employs Alda Venn?
Answer: Quillon Works
- Why?
4. Where was Alda Venn born?"""
QUESTIONS = [
    "Where was Alda Venn born?",
    "In what year was Alda Venn born?",
    "Who employs Alda Venn?",
]


def test_parse_questions_keeps_only_the_questions() -> None:
    assert parse_questions(GENERATED) == QUESTIONS
    assert parse_questions("Alda Venn is an engineer.\nNo questions here.") == []


def test_probes_are_answered_with_the_document_in_context(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def written(model: object, tok: object, request: str, *args: object, **kw: object) -> list:
        seen["request"] = request
        return [GENERATED]

    def answered(model: object, tok: object, questions: list[str], contexts: list[str], **kw):
        seen["questions"], seen["contexts"] = questions, contexts
        return ["Marrow Bay", "", "Quillon Works"]

    monkeypatch.setattr("adaptation.best_of_k.write_generations", written)
    monkeypatch.setattr("adaptation.best_of_k.generate_answers", answered)
    model, tok = load_base(tiny_model_dir, device="cpu")
    probes = write_probes(model, tok, DOC.title, DOC.text, ProbeWriting(questions=3))
    assert DOC.text in str(seen["request"]) and "3 different questions" in str(seen["request"])
    assert seen["questions"] == QUESTIONS
    assert all(DOC.text in c and DOC.title in c for c in seen["contexts"])  # type: ignore[union-attr]
    # the question the in-context reading left unanswered is no probe
    assert probes == [QA(QUESTIONS[0], ("Marrow Bay",)), QA(QUESTIONS[2], ("Quillon Works",))]


def test_an_instruct_base_is_asked_for_probes_in_its_chat_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adaptation import best_of_k as module
    from tests.conftest import tiny_model
    from tests.test_prompts import chat_tokenizer

    tok = chat_tokenizer()
    prepare_tokenizer(tok)
    model = tiny_model("llama", len(tok))
    requests: list[str] = []
    real = module.write_generations

    def spy(m: object, t: object, request: str, *args: object, **kw: object) -> list[str]:
        requests.append(request)
        return real(m, t, request, *args, **kw)

    monkeypatch.setattr(module, "write_generations", spy)
    probes = write_probes(model, tok, DOC.title, DOC.text, ProbeWriting(2, max_new_tokens=24))
    assert requests[0].startswith("<|im_start|>system") and DOC.text in requests[0]
    assert requests[0].endswith("<|im_start|>assistant\n")
    assert all(q.question.endswith("?") and q.answers[0] for q in probes)
