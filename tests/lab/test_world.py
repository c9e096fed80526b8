import json
from pathlib import Path

from adaptation.lab.world import PERSON_FACTS, WorldConfig, build_world, newcomers, write_world

SMALL = WorldConfig(
    pretrain_people=20,
    meta_train_people=6,
    meta_val_people=4,
    eval_people=10,
    retention_questions=10,
)


def test_same_seed_same_world_different_seed_different_world(tmp_path: Path) -> None:
    a = write_world(tmp_path / "a", SMALL)
    b = write_world(tmp_path / "b", SMALL)
    c = write_world(tmp_path / "c", SMALL.replace(seed=1))
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["eval_stream"].read_bytes() != c["eval_stream"].read_bytes()


def test_splits_have_the_promised_shape() -> None:
    world = build_world(SMALL)
    pre = world["pretrain"]
    people_with_qa = {d.meta["entity"] for d in pre if d.questions and d.id.startswith("pre-")}
    heldout = {d.meta["entity"] for d in world["pretrain_heldout_qa"]}
    assert people_with_qa and heldout and not people_with_qa & heldout
    assert len(people_with_qa) == len(heldout) == SMALL.pretrain_people // 2
    stream_names = {d.meta["entity"] for d in world["eval_stream"]}
    assert not stream_names & {d.meta["entity"] for d in pre}, "eval entities must be new"
    assert not stream_names & {d.meta["entity"] for d in world["meta_train"]}
    assert all(len(PERSON_FACTS[r][0]) >= 4 and len(PERSON_FACTS[r][1]) >= 3 for r in PERSON_FACTS)


def test_newcomers_are_new_to_every_split_and_leave_the_splits_alone() -> None:
    before = build_world(SMALL)
    people = newcomers(SMALL, 12, "read")
    assert people == newcomers(SMALL, 12, "read")  # deterministic
    names = {d.meta["entity"] for d in people}
    assert len(names) == 12
    for split, docs in build_world(SMALL).items():
        assert docs == before[split], split
        assert not names & {d.meta["entity"] for d in docs}, split
        assert not names & {d.title for d in docs}, split
    orgs = {d.meta["entity"] for d in before["pretrain"] if d.id.startswith("org-")}
    employers = {qa.answers[0] for d in people for qa in d.questions if "work" in qa.question}
    assert employers and employers <= orgs  # they work for the world's organisations


def test_facts_are_in_their_document_and_changes_expect_the_newest_value() -> None:
    world = build_world(SMALL.replace(change_fraction=0.5))
    stream = world["eval_stream"]
    changes = [d for d in stream if d.meta["change"]]
    assert changes, "some documents must change an earlier fact"
    for d in stream:
        for q in d.questions:
            assert q.answers[0] in d.text, (q, d.text)
    for d in changes:
        earlier = [e for e in stream if e.meta["entity"] == d.meta["entity"] and e.time < d.time]
        assert earlier, "a change follows the fact it changes"
        assert len(d.questions) == 1
        assert d.questions[0].answers[0] in d.text


def test_filler_carries_distractors_that_are_never_asked_about() -> None:
    world = build_world(SMALL)
    for doc in world["eval_stream"] + world["pretrain"]:
        answers = {a for q in doc.questions for a in q.answers if not a.isdigit()}
        body = doc.text.split("\n", 1)[1].split(". ")
        filler = [s for s in body if doc.meta["entity"] not in s]
        assert len(filler) >= 2
        assert any(any(ch.isdigit() for ch in s) for s in filler)
        assert not any(a in s for a in answers for s in filler), doc.text


def test_jsonl_matches_the_dataset_format(tmp_path: Path) -> None:
    paths = write_world(tmp_path, SMALL)
    line = json.loads(paths["eval_stream"].read_text().splitlines()[0])
    assert {"id", "text", "source", "time", "questions"} <= set(line)
    assert {"question", "answers"} == set(line["questions"][0])
