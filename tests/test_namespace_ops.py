"""Namespace settings, rollback, forgetting and the update guard, through the live API (uvicorn),
a real Redis and a worker in this process, on a tiny random model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from adaptation.answering import SCORED_ANSWER_TOKENS, generate_answers
from adaptation.modeling import load_base
from service.backends.lora import LoraBackend
from service.keys import Keys
from tests.servicekit import QUESTION, Stack, assert_same, differs, open_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    # Snapshots only every two documents, so the versions a test sees are deterministic.
    tmp = tmp_path_factory.mktemp("namespace-ops")
    with open_stack(tmp, tiny_model_dir, snapshot_every=2, snapshot_seconds=600) as opened:
        yield opened


def test_namespace_settings_are_validated_stored_and_used_by_the_worker(stack: Stack) -> None:
    ns = "configured"
    for body, needle in [
        ({"lr": -1}, "lr"),
        ({"lr": 5}, "lr"),
        ({"steps_per_doc": 0}, "steps_per_doc"),
        ({"mode": "mac"}, "use 'lora'"),
        ({"strategy": "tfidf"}, "choose one of uniform, salient"),
        ({"strategy": "shouting"}, "strategy"),
        ({"probes": [{"question": "Who?", "answers": []}]}, "answers"),
        ({"probes": [{"question": "  ", "answers": ["x"]}]}, "question"),
        ({"guard_epsilon": 2}, "guard_epsilon"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ]:
        response = stack.http.put(f"/v1/namespaces/{ns}", json=body)
        assert response.status_code == 422, (body, response.text)
        assert needle in response.text, (body, response.text)
    assert stack.http.put("/v1/namespaces/no spaces", json={}).status_code == 422

    out = stack.configure(ns, lr=0.002, steps_per_doc=2)
    assert out["config"]["lr"] == 0.002 and out["config"]["strategy"] is None
    assert out["effective"] == {
        "mode": "lora",
        "strategy": "uniform",
        "lr": 0.002,
        "steps_per_doc": 2,
        "guard_epsilon": stack.settings.guard_epsilon,
        "probes": "none",
        "self_edit_k": 1,
        "self_edit_prompt": "implications",
        "self_edit_tokens": 128,
        "default_trust": 1.0,
        "source_tags": False,
        "rehearse": 0,
        "rehearsal_window": 64,
    }
    assert [op["operation"] for op in out["pending_operations"]] == ["configure"]

    ids = stack.submit(ns, ["Oda Lind keeps goats in Hale.", "Hale lies on the river Oss."])
    stack.drain(lambda: stack.applied(ids) and stack.idle(ns))
    manifest = stack.store.manifest(ns, 1)
    assert (manifest.info["lr"], manifest.info["steps_per_doc"]) == (0.002, 2)
    backend = stack.worker.namespaces[ns].backend
    assert isinstance(backend, LoraBackend)
    assert backend.learner.updater.steps_applied == 4  # two steps for each of the two documents

    # A new rate reaches the namespace resumed from its snapshot, optimizer state included.
    stack.configure(ns, lr=0.004, steps_per_doc=2)
    stack.drain(lambda: stack.idle(ns))
    backend = stack.worker.namespaces[ns].backend
    assert isinstance(backend, LoraBackend)
    updater = backend.learner.updater
    assert [g["lr"] for g in updater.optimizer.param_groups] == [0.004]
    assert updater.steps_applied == 4 and updater.optimizer.state_dict()["state"]


def test_rollback_serves_the_old_version_and_the_lineage_continues_from_it(
    stack: Stack,
) -> None:
    ns, lr = "rollback", 0.01
    stack.configure(ns, lr=lr)
    first_texts = ["Alda Venn was born in Marrow Bay.", "Alda Venn works for Quillon Works."]
    first = stack.submit(ns, first_texts)
    stack.drain(lambda: stack.applied(first))
    at_first = stack.ask(ns, 1)
    second = stack.submit(ns, ["Alda Venn moved to Port Selka.", "Port Selka stayed mild."])
    stack.drain(lambda: stack.applied(second))
    assert stack.ask(ns, 2) != at_first  # the second update changed the answer

    assert stack.http.post(f"/v1/namespaces/{ns}/rollback", json={"version": 2}).status_code == 409
    missing = stack.http.post(f"/v1/namespaces/{ns}/rollback", json={"version": 9})
    assert missing.status_code == 404 and "GET /v1/adapters" in missing.json()["detail"]
    accepted = stack.http.post(f"/v1/namespaces/{ns}/rollback", json={"version": 1})
    assert accepted.status_code == 202, accepted.text
    op = accepted.json()
    assert (op["operation"], op["version"], op["namespace"]) == ("rollback", 1, ns)
    stack.drain(lambda: stack.idle(ns))

    restored = stack.store.manifest(ns, 3)
    assert (restored.parent, restored.doc_ids, restored.info["rollback_to"]) == (1, (), 1)
    assert restored.info["request"] == op["request"]
    assert_same(stack.weights(ns, 3), stack.weights(ns, 1))
    assert stack.ask(ns, 3) == at_first
    assert all(stack.status(i)["status"] == "rolled_back" for i in second)
    assert all(stack.status(i)["adapter_version"] == 1 for i in first)
    waited = stack.http.post(
        "/v1/answer", json={"question": QUESTION, "namespace": ns, "wait_for": second}
    )
    assert waited.status_code == 409 and "rolled_back" in waited.json()["detail"]

    third_texts = ["Alda Venn left Quillon Works.", "Alda Venn now works for Vantor Labs."]
    third = stack.submit(ns, third_texts)
    stack.drain(lambda: stack.applied(third))
    latest = stack.store.manifest(ns, 4)
    assert latest.parent == 3
    assert sorted(stack.store.lineage(ns, 4)) == sorted(first + third)
    assert_same(stack.weights(ns, 4), stack.replay(first_texts + third_texts, lr))
    stack.ask(ns, 4)


def test_forget_replays_the_lineage_without_the_document(stack: Stack) -> None:
    ns, lr = "forget", 0.01
    stack.configure(ns, lr=lr)
    texts = [f"Fact {i}: Oda Lind{i} was born in Hale {i} in {1950 + i}." for i in range(6)]
    ids = stack.submit(ns, texts)
    stack.drain(lambda: stack.applied(ids))
    assert stack.store.latest(ns) == 3  # (0, 1), (2, 3), (4, 5)
    before = stack.weights(ns, 3)
    stack.ask(ns, 3)

    accepted = stack.http.delete(f"/v1/documents/{ids[2]}")
    assert accepted.status_code == 202, accepted.text
    op = accepted.json()
    assert (op["operation"], op["document"], op["namespace"]) == ("forget", ids[2], ns)
    stack.drain(lambda: stack.status(ids[2])["status"] == "forgotten" and stack.idle(ns))

    forgot = stack.store.manifest(ns, 4)
    assert forgot.parent == 1  # the last snapshot before the document
    assert forgot.doc_ids == (ids[3], ids[4], ids[5])
    assert forgot.info["forgotten"] == [ids[2]] and forgot.info["request"] == op["request"]
    assert ids[2] not in stack.store.lineage(ns, 4)
    kept = [t for i, t in enumerate(texts) if i != 2]
    assert_same(stack.weights(ns, 4), stack.replay(kept, lr))
    assert differs(stack.weights(ns, 4), before)
    stack.ask(ns, 4)

    record = stack.worker.redis.hgetall(Keys(stack.settings.redis_prefix).doc(ids[2]))
    assert record["status"] == "forgotten" and "text" not in record
    assert [stack.status(i)["adapter_version"] for i in ids[3:]] == [4, 4, 4]
    assert stack.status(ids[0])["adapter_version"] == 1
    # The same content sent again is recognised, not learned again.
    again = stack.http.post("/v1/documents", json={"text": texts[2], "namespace": ns})
    assert again.json()["status"] == "forgotten"

    # Versions that still hold the forgotten document cannot be restored.
    refused = stack.http.post(f"/v1/namespaces/{ns}/rollback", json={"version": 3})
    assert refused.status_code == 409 and ids[2] in refused.json()["detail"]
    assert stack.http.delete(f"/v1/documents/{ids[2]}").status_code == 202
    stack.drain(lambda: stack.idle(ns))
    assert stack.store.latest(ns) == 4  # nothing left to forget: no new version
    assert stack.http.delete("/v1/documents/no-such-document").status_code == 404


def test_update_guard_holds_back_a_version_that_drops_probe_f1(
    stack: Stack, tiny_model_dir: Path
) -> None:
    ns = "guarded"
    questions = ["Where was Alda Venn born?", "Who does Alda Venn work for?"]
    base, tokenizer = load_base(str(tiny_model_dir), "cpu")
    # The base model's own answers are the gold ones: version 0 scores F1 1.0 on them.
    golds = generate_answers(base, tokenizer, questions, max_new_tokens=SCORED_ANSWER_TOKENS)
    probes = [{"question": q, "answers": [a]} for q, a in zip(questions, golds, strict=True)]
    huge = 1.0  # a learning rate that wrecks the tiny model's answers

    out = stack.configure(ns, lr=huge, probes=probes, guard_epsilon=0.5)
    assert out["effective"]["probes"] == "namespace"
    held = stack.submit(ns, ["Alda Venn was born in Marrow Bay.", "She works for Quillon."])
    stack.drain(lambda: all(stack.status(i)["status"] == "held" for i in held))
    for doc_id in held:
        error = str(stack.status(doc_id)["error"])
        assert "probe F1 would fall from 1.000" in error and "guard_epsilon=0.5" in error
    assert stack.store.latest(ns) == 0
    assert stack.http.get(f"/v1/namespaces/{ns}").json()["published_version"] == 0
    stack.ask(ns, 0)  # still served from the previous version
    stats = stack.worker.redis.hgetall(Keys(stack.settings.redis_prefix).stats(ns))
    assert stats["held"] == "2" and "applied" not in stats

    # The same update under a tolerance it stays within is published.
    stack.configure(ns, lr=huge, probes=probes, guard_epsilon=1.0)
    passed = stack.submit(ns, ["Alda Venn was born in Port Selka.", "She works for Vantor."])
    stack.drain(lambda: stack.applied(passed))
    manifest = stack.store.manifest(ns, 1)
    assert manifest.info["lr"] == huge
    assert manifest.info["probe_f1"] < 0.5  # a drop the first epsilon would have held back
    stack.ask(ns, 1)


def test_an_operation_cut_short_before_its_entry_is_deleted_is_settled_not_repeated(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = "interrupted"
    first = stack.submit(ns, ["Ivo Brand lives in Hale.", "Ivo Brand fishes in the Oss."])
    stack.drain(lambda: stack.applied(first))
    second = stack.submit(ns, ["Ivo Brand moved to Selka.", "Ivo Brand sold his boat."])
    stack.drain(lambda: stack.applied(second))
    assert stack.http.post(f"/v1/namespaces/{ns}/rollback", json={"version": 1}).status_code == 202

    def crash(*_: object) -> None:
        raise redis.ConnectionError("simulated crash before the entry is deleted")

    monkeypatch.setattr(stack.worker.ns_store, "done", crash)
    with pytest.raises(redis.ConnectionError):
        stack.drain(lambda: False)
    monkeypatch.undo()
    assert stack.store.latest(ns) == 3 and not stack.idle(ns)
    # As if the crash had also come before the statuses were settled.
    stack.worker.docs.mark_applied(second, 2)

    stack.drain(lambda: stack.idle(ns))
    assert stack.store.latest(ns) == 3  # settled again, not rolled back a second time
    assert all(stack.status(i)["status"] == "rolled_back" for i in second)
