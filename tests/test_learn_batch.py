"""Micro-batching (`UPTAKE_LEARN_BATCH`, `uptake eval --learn-batch`): queued documents of one
chunk, without self-edits and of one trust are learned in one step on a padded micro-batch, by
the learner the worker and the eval share; the worker records each micro-batch, and a forget
replays it together again."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptation.data import QA, Document
from adaptation.learner import IngestResult, Learner, LearnSettings, fresh_adapter
from adaptation.modeling import LoraSettings, load_base, lora_parameters
from adaptation.updater import UpdateConfig
from adaptation.weighting import make_weighter
from adaptation.weighting.base import WeightedText, encode_weighted
from service.backends.lora import LORA_SEED, LoraBackend, LoraModels, build_weighter
from service.cli import build_parser
from tests.servicekit import ADAPTER_FILE, Stack, assert_same, make_settings, open_stack

TEXTS = [f"Oda Lind{i} was born in Hale {i} in {1950 + i} and keeps goats." for i in range(6)]
LONG = " ".join(f"Brun Hollis{i} sold {i} carts of turnips at the Vell market." for i in range(4))


def _learner(model_dir: Path, **settings: int) -> Learner:
    model, tokenizer = load_base(model_dir, device="cpu")
    adapter = fresh_adapter(model, LoraSettings(rank=4, alpha=8), LORA_SEED)
    learn = LearnSettings(chunk_chars=100, max_doc_tokens=128, **settings)
    return Learner(adapter, tokenizer, make_weighter("uniform"), UpdateConfig(lr=1e-2), learn)


def _lora(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_parameters(learner.model).items()}


def _stacked(learner: Learner, texts: Sequence[str]) -> list[WeightedText]:
    """The texts as the learner weighs them, for a manual step on them together."""
    s = learner.settings
    return [
        encode_weighted(t, learner.tokenizer, learner.weighter, s.max_doc_tokens) for t in texts
    ]


def test_two_one_chunk_documents_take_one_step_per_epoch_on_their_padded_batch(
    tiny_model_dir: Path,
) -> None:
    learner = _learner(tiny_model_dir, epochs=2)
    docs = [Document("a", TEXTS[0]), Document("b", TEXTS[1] + " And sheep, many sheep.")]
    results = learner.learn_together([(d, 1.0) for d in docs])

    assert learner.updater.steps_applied == 2  # one step per epoch, not one per document
    own = [w.num_tokens for w in _stacked(learner, [d.text for d in docs])]
    assert own[0] != own[1]  # so the batch is padded
    for result, tokens in zip(results, own, strict=True):
        assert result.applied and result.tokens == 2 * tokens  # its own tokens, per pass
        assert result.batch == ("a", "b") and result.note == "learned in a micro-batch of 2"
        assert (result.sequences, result.self_edit_sequences) == (1, 0)

    manual = _learner(tiny_model_dir, epochs=2)
    batch = _stacked(manual, [d.text for d in docs])
    for _ in range(2):
        assert all(r.applied for r in manual.updater.apply(batch))
    assert_same(_lora(learner), _lora(manual))


def test_documents_with_self_edits_or_several_chunks_are_learned_alone(
    tiny_model_dir: Path,
) -> None:
    edited = Document("c", TEXTS[2], self_edits=("1. Oda Lind2 keeps goats.",))
    items = [
        (Document("a", TEXTS[0]), 1.0),
        (Document("long", LONG), 1.0),  # several chunks of at most 100 characters
        (edited, 1.0),
        (Document("d", TEXTS[3]), 1.0),
        (Document("e", TEXTS[4]), 1.0),
    ]
    learner = _learner(tiny_model_dir)
    results = learner.learn_together(items)
    assert [r.batch for r in results] == [None, None, None, ("d", "e"), ("d", "e")]
    assert results[1].sequences == 3 and results[2].self_edit_sequences == 1

    one_by_one = _learner(tiny_model_dir)
    alone = [one_by_one.learn(doc, trust) for doc, trust in items[:3]]
    assert alone == results[:3]  # exactly as `learn` learns them
    one_by_one.updater.apply(_stacked(one_by_one, [TEXTS[3], TEXTS[4]]))
    assert one_by_one.updater.steps_applied == learner.updater.steps_applied
    assert_same(_lora(learner), _lora(one_by_one))


def test_different_trusts_are_not_mixed(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    docs = [Document(f"t{i}", t) for i, t in enumerate(TEXTS[:5])]
    trusts = [1.0, 0.5, 0.5, 0.0, 0.0]
    results = learner.learn_together(list(zip(docs, trusts, strict=True)))
    assert [r.batch for r in results] == [None, ("t1", "t2"), ("t1", "t2"), None, None]
    assert [r.trust for r in results] == trusts
    assert results[3].sequences == 0 and results[3].note and "trust 0" in results[3].note
    assert learner.updater.steps_applied == 2


def test_the_eval_learns_a_micro_batch_as_the_worker_does(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptation.lab import evaluation

    run_eval = evaluation.run_eval
    got: list[evaluation.EvalConfig] = []
    monkeypatch.setattr(evaluation, "run_eval", lambda *a, **k: got.append(a[3]) or {})
    monkeypatch.setattr(evaluation, "report_markdown", lambda _: "")
    argv = ["eval", "--data", "d.jsonl", "--out", "o", "--learn-batch", "2"]
    args: argparse.Namespace = build_parser().parse_args(argv)
    assert args.handler(args) == 0 and got[0].learning.learn_batch == 2
    assert build_parser().parse_args(argv[:5]).learn_batch is None  # the default, 1, holds

    settings = make_settings(tiny_model_dir, tmp_path, "redis://unused", "p", learn_batch=2)
    backend = LoraModels(settings, make_weighter("uniform")).open("ns", None, settings)
    items = [(Document(f"w{i}", t, source="wire"), 0.5) for i, t in enumerate(TEXTS[:3])]
    by_worker = backend.ingest_together(items)
    cfg = evaluation.EvalConfig(
        lora=LoraSettings(rank=4, alpha=8), learning=got[0].learning, device="cpu"
    )
    method = evaluation.make_method("uniform", str(tiny_model_dir), cfg, settings.lr, LORA_SEED, [])
    by_eval = method.ingest_together(items)
    assert by_worker == by_eval
    assert [r.batch for r in by_eval] == [("w0", "w1", "w2")] * 3
    assert isinstance(method, evaluation.LoraMethod)
    worker_end = {
        n.replace(f".{backend.name}.", ".default."): p
        for n, p in lora_parameters(backend.model).items()
    }
    assert_same(worker_end, dict(lora_parameters(method.model)))
    with pytest.raises(ValueError, match="stream protocol"):
        run_eval(tmp_path / "none.jsonl", tiny_model_dir, tmp_path, replace(cfg, protocol="single"))


def test_the_eval_stream_learns_k_documents_at_a_time(tiny_model_dir: Path) -> None:
    from adaptation.lab import evaluation

    docs = [
        Document(f"q{i}", t, questions=(QA(f"Where was Oda Lind{i} born?", (f"Hale {i}",)),))
        for i, t in enumerate(TEXTS[:3])
    ]
    learning = LearnSettings(learn_batch=2)
    cfg = evaluation.EvalConfig(lora=LoraSettings(rank=4, alpha=8), learning=learning, device="cpu")
    method = evaluation.make_method("uniform", str(tiny_model_dir), cfg, 1e-2, LORA_SEED, [])
    base = evaluation.Baseline.measure(
        evaluation.BaseMethod(str(tiny_model_dir), cfg), docs, evaluation.Held()
    )
    run = evaluation.Run("uniform", 0, 1e-2, 1, checkpoints=3, progress=False)
    result = evaluation.run_method(method, base, cfg, run)
    assert isinstance(method, evaluation.LoraMethod)
    assert method.learner.updater.steps_applied == 2  # a pair, then the last alone
    assert [n for n, _ in result.curve] == [0, 2, 3]  # scored after each micro-batch
    assert "learned 2 at a time" in evaluation._protocol_text(
        {"protocol": "stream", "documents": 3, "config": {"learning": asdict(learning)}}
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("learn-batch")
    with open_stack(
        tmp, tiny_model_dir, learn_batch=2, snapshot_every=4, snapshot_seconds=600
    ) as opened:
        yield opened


def _backend(stack: Stack, namespace: str) -> LoraBackend:
    backend = stack.worker.namespaces[namespace].backend
    assert isinstance(backend, LoraBackend)
    return backend


def test_four_queued_documents_are_learned_in_two_steps_and_one_snapshot(stack: Stack) -> None:
    ids = stack.submit("pairs", TEXTS[:4])
    stack.drain(lambda: stack.applied(ids))
    assert stack.store.latest("pairs") == 1
    assert list(stack.store.manifest("pairs", 1).doc_ids) == ids
    assert stack.store.manifest("pairs", 1).info["learn_batch"] == 2
    assert _backend(stack, "pairs").learner.updater.steps_applied == 2
    records = [stack.worker.docs.get(i) for i in ids]
    assert [r.batch for r in records if r] == [tuple(ids[:2])] * 2 + [tuple(ids[2:])] * 2
    assert all(r and r.note == "learned in a micro-batch of 2" for r in records)
    assert all(stack.status(i)["attempts"] == 0 for i in ids)


def test_a_failing_micro_batch_retries_each_of_its_documents(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    together = LoraBackend.ingest_together

    def once(self: LoraBackend, items: Sequence[tuple[Document, float]]) -> list[IngestResult]:
        calls.append([doc.id for doc, _ in items])
        if len(calls) == 1:
            raise RuntimeError("out of memory, once")
        return together(self, items)

    monkeypatch.setattr(LoraBackend, "ingest_together", once)
    ids = stack.submit("flaky", TEXTS[:4])
    stack.drain(lambda: stack.applied(ids))
    assert calls[0] == ids[:2]
    # The failed pair was counted once and learned later; nothing was lost or learned twice.
    assert [stack.status(i)["attempts"] for i in ids] == [1, 1, 0, 0]
    lineage = [
        d for v in stack.store.versions("flaky") for d in stack.store.manifest("flaky", v).doc_ids
    ]
    assert sorted(lineage) == sorted(ids)


def test_a_forget_replays_the_other_micro_batches_together(stack: Stack) -> None:
    ns = "forgets"
    ids = stack.submit(ns, TEXTS[:4])
    stack.drain(lambda: stack.applied(ids))
    assert stack.store.latest(ns) == 1
    assert stack.http.delete(f"/v1/documents/{ids[0]}").status_code == 202
    stack.drain(lambda: stack.status(ids[0])["status"] == "forgotten" and stack.idle(ns))
    assert list(stack.store.manifest(ns, 2).doc_ids) == ids[1:]
    assert _backend(stack, ns).learner.updater.steps_applied == 2  # alone, then together

    # The same, learned directly: the forgotten one's partner alone, then the other pair.
    settings = stack.settings
    direct = LoraModels(settings, build_weighter(settings)).open("direct", None, settings)
    docs = [Document(i, t) for i, t in zip(ids, TEXTS, strict=False)]
    assert direct.ingest(docs[1]).applied
    assert [r.batch for r in direct.ingest_together([(d, 1.0) for d in docs[2:]])] == [
        tuple(ids[2:])
    ] * 2
    out = stack.tmp / "forget-direct"
    out.mkdir()
    direct.write_state(out)
    assert_same(stack.weights(ns, 2), load_file(str(out / ADAPTER_FILE)))
