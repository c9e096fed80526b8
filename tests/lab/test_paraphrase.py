import dataclasses

import pytest

from adaptation.data import Document
from adaptation.lab.paraphrase import extract_facts, paraphrase, with_paraphrases
from adaptation.lab.world import WorldConfig, build_world
from adaptation.learner import edit_sequences
from adaptation.prompts import qa_text
from adaptation.self_edit import parse_self_edits

SMALL = WorldConfig(
    pretrain_people=12,
    meta_train_people=4,
    meta_val_people=4,
    eval_people=30,
    change_fraction=0.5,
    retention_questions=5,
)


@pytest.fixture(scope="module")
def world() -> dict[str, list[Document]]:
    return build_world(SMALL)


def test_every_fact_sentence_is_found_with_its_value(world) -> None:
    docs = world["pretrain"] + world["eval_stream"]
    for d in docs:
        facts = extract_facts(d)
        assert sorted(f.relation for f in facts) == sorted(d.meta["relations"]), d.text
        assert all(f.value in d.text for f in facts)
        values = {f.value for f in facts}
        assert all(q.answers[0] in values for q in d.questions), (d.text, d.questions)
    changes = [d for d in world["eval_stream"] if d.meta.get("change")]
    assert changes
    for d in changes:
        (fact,) = extract_facts(d)
        assert fact.old is not None and fact.old != fact.value and fact.old in d.text


def test_edits_are_facts_only_restated_and_asked(world) -> None:
    for d in world["eval_stream"]:
        facts = extract_facts(d)
        values = {f.value for f in facts}
        for edit in paraphrase(d, k=2, seed=0):
            seqs = parse_self_edits(edit)
            questions = [s for s in seqs if s.startswith("Question: ")]
            statements = [s for s in seqs if not s.startswith("Question: ")]
            assert len(questions) == len(facts)
            for q in questions:
                asked, answer = q.split("\nAnswer: ")
                assert qa_text(asked.removeprefix("Question: "), answer) == q
                assert answer in values and d.meta["entity"] in asked
            for s in statements:
                assert s not in d.text, "a restatement must use another template"
                restated = extract_facts(dataclasses.replace(d, text=s))
                assert len(restated) == 1 and restated[0].value in values, s


def test_changes_restate_the_new_value_and_the_move(world) -> None:
    d = next(d for d in world["eval_stream"] if d.meta.get("change"))
    (fact,) = extract_facts(d)
    (edit,) = paraphrase(d, k=1, seed=3)
    restated = [extract_facts(dataclasses.replace(d, text=s)) for s in parse_self_edits(edit)]
    kinds = [r[0].old is not None for r in restated if r]
    assert kinds == [True, False]
    assert edit.endswith(f"Answer: {fact.value}")


def test_deterministic_per_seed_and_k_edits_differ(world) -> None:
    docs = world["eval_stream"]
    assert [paraphrase(d, 3, seed=1) for d in docs] == [paraphrase(d, 3, seed=1) for d in docs]
    assert [paraphrase(d, 3, seed=1) for d in docs] != [paraphrase(d, 3, seed=2) for d in docs]
    assert all(len(set(paraphrase(d, 3, seed=0))) == 3 for d in docs)
    assert all("Question:" not in e for d in docs for e in paraphrase(d, 2, qa=False))


def test_documents_get_self_edits_that_become_training_sequences(world) -> None:
    docs = with_paraphrases(world["eval_stream"][:3], k=2, seed=0)
    for d in docs:
        assert len(d.self_edits) == 2
        edits = [e for g in d.self_edits for e in parse_self_edits(g)]
        seqs = edit_sequences(d, edits, chunk_chars=4000)
        assert seqs and all(s.startswith(f"{d.title}\n") for s in seqs)
        assert f"{d.title}\n{d.text}" not in seqs


def test_documents_without_facts_or_entity() -> None:
    plain = Document(id="x", text="Nothing to see here.", title="Nobody")
    assert paraphrase(plain, k=2) == []
    with pytest.raises(ValueError, match="entity"):
        paraphrase(Document(id="y", text="Untitled text."))
    with pytest.raises(ValueError, match="k must"):
        paraphrase(plain, k=0)
