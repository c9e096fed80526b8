"""Rehearsal, the mechanism that makes earlier knowledge last: the learner learns a few earlier
documents again with each new one, chosen deterministically; the worker keeps its memory in every
snapshot, resumes it after a restart, and a forget leaves the forgotten text out of it; and
`uptake eval` rehearses through the same learner."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adaptation import learner as learner_module
from adaptation.data import Document
from adaptation.learner import Learner, LearnSettings, fresh_adapter
from adaptation.modeling import LoraSettings, load_base, lora_parameters
from adaptation.rehearsal import RehearsalMemory, Remembered
from adaptation.updater import UpdateConfig
from service.backends.lora import LORA_SEED, REHEARSAL_FILE, LoraBackend
from service.cli import build_parser
from service.worker import Worker
from tests.conftest import RecordingWeighter
from tests.servicekit import Stack, assert_same, open_stack

TEXTS = [f"Oda Lind{i} was born in Hale {i} in {1950 + i} and keeps goats." for i in range(8)]


def _learner(model_dir: Path, weighter: RecordingWeighter, **settings: int) -> Learner:
    model, tokenizer = load_base(model_dir, device="cpu")
    adapter = fresh_adapter(model, LoraSettings(rank=4, alpha=8), LORA_SEED)
    return Learner(adapter, tokenizer, weighter, UpdateConfig(lr=1e-2), LearnSettings(**settings))


def test_each_new_document_is_followed_by_earlier_ones_chosen_the_same_way_every_time(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusts: list[float] = []
    apply_trusted = learner_module.apply_trusted

    def recording(updater, docs, weight):  # type: ignore[no-untyped-def]
        trusts.append(weight)
        return apply_trusted(updater, docs, weight)

    monkeypatch.setattr(learner_module, "apply_trusted", recording)
    runs = []
    for _ in range(2):
        weighter = RecordingWeighter()
        learner = _learner(tiny_model_dir, weighter, rehearse=2, rehearsal_window=3)
        seen, trusts[:] = [], []
        for i, text in enumerate(TEXTS[:6]):
            weighter.texts.clear()
            trust = 0.5 if i == 1 else 0.0 if i == 2 else 1.0
            result = learner.learn(Document(f"d{i}", text), trust)
            seen.append((list(weighter.texts), result.rehearsed))
        runs.append((seen, list(trusts), _lora(learner)))

    seen, recorded_trusts, weights = runs[0]
    assert seen[0] == ([TEXTS[0]], 0)  # nothing to rehearse yet
    assert seen[1] == ([TEXTS[1], TEXTS[0]], 1)
    assert seen[2] == ([], None)  # trust 0: nothing learned, and not remembered
    assert seen[3] == ([TEXTS[3], TEXTS[0], TEXTS[1]], 2)  # the only two, in learning order
    for i in range(4, 6):
        texts, rehearsed = seen[i]
        window = [t for j, t in enumerate(TEXTS[:i]) if j != 2][-3:]
        assert texts[0] == TEXTS[i] and rehearsed == 2
        assert len(set(texts[1:])) == 2 and set(texts[1:]) <= set(window)
        assert texts[1:] == sorted(texts[1:], key=window.index)
    # Each document is rehearsed at the trust it was learned with (the second at 0.5).
    assert recorded_trusts[:6] == [1.0, 0.5, 1.0, 1.0, 1.0, 0.5]
    # Rehearsal's low losses stay out of the explosion check's record of new documents' losses.
    assert len(learner.updater._recent) == 5
    assert runs[1][0] == seen and runs[1][1] == recorded_trusts
    assert all(torch.equal(weights[n], runs[1][2][n]) for n in weights), "deterministic"


def _lora(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_parameters(learner.model).items()}


def test_rehearsal_off_remembers_nothing_and_learns_as_before(tiny_model_dir: Path) -> None:
    weighter = RecordingWeighter()
    learner = _learner(tiny_model_dir, weighter)
    for i, text in enumerate(TEXTS[:3]):
        assert learner.learn(Document(f"d{i}", text)).rehearsed is None
    assert weighter.texts == TEXTS[:3] and len(learner.memory) == 0


def test_the_memory_keeps_the_newest_window_and_survives_a_file(tmp_path: Path) -> None:
    memory = RehearsalMemory(window=3)
    for i in range(5):
        memory.remember(Remembered(f"d{i}", f"text {i}", None, "wire", 1.0, (f"edit {i}",)))
    memory.remember(Remembered("d3", "text 3", "T", None, 0.5))  # learned again: kept once, last
    assert [e.id for e in memory] == ["d2", "d4", "d3"]
    assert memory.choose("d9", 2) == memory.choose("d9", 2)
    assert len(memory.choose("d9", 5)) == 3 and memory.choose("d4", 5)[0].id == "d2"
    memory.save(tmp_path / "m.jsonl")
    smaller = RehearsalMemory(window=2)
    smaller.load(tmp_path / "m.jsonl")
    assert list(smaller) == list(memory)[1:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("rehearsal")
    with open_stack(tmp, tiny_model_dir, snapshot_every=2, snapshot_seconds=600) as opened:
        yield opened


def _memory(stack: Stack, namespace: str, version: int) -> list[Remembered]:
    memory = RehearsalMemory(window=64)
    memory.load(stack.store.path(namespace, version) / REHEARSAL_FILE)
    return list(memory)


def test_the_worker_rehearses_resumes_its_memory_and_forgets_out_of_it(
    stack: Stack, tmp_path: Path
) -> None:
    ns, lr, rehearsal = "rehearsed", 0.01, {"rehearse": 2, "rehearsal_window": 8}
    out = stack.configure(ns, lr=lr, **rehearsal)
    assert (out["effective"]["rehearse"], out["effective"]["rehearsal_window"]) == (2, 8)
    ids = stack.submit(ns, TEXTS[:6])
    stack.drain(lambda: stack.applied(ids))
    assert stack.store.latest(ns) == 3
    info = stack.store.manifest(ns, 3).info
    assert (info["rehearse"], info["rehearsal_window"]) == (2, 8)
    assert [(e.id, e.text) for e in _memory(stack, ns, 3)] == list(zip(ids, TEXTS[:6]))
    docs = [Document(i, t) for i, t in zip(ids, TEXTS, strict=False)]

    # A restart: a new worker opens the namespace from its snapshot, memory included, and goes
    # on exactly as a lineage that was never interrupted.
    stack.worker.shutdown()
    stack.worker = Worker(stack.settings)
    stack.worker.load()
    more = stack.submit(ns, TEXTS[6:])
    stack.drain(lambda: stack.applied(more))
    backend = stack.worker.namespaces[ns].backend
    assert isinstance(backend, LoraBackend)
    assert [e.id for e in backend.learner.memory] == ids + more
    docs += [Document(i, t) for i, t in zip(more, TEXTS[6:], strict=True)]
    assert_same(stack.weights(ns, 4), stack.replay(docs, lr, **rehearsal))

    # Forgetting the third document replays from the version before it: the weights are a
    # lineage's that never saw it, and its text is in no memory the new version keeps.
    assert stack.http.delete(f"/v1/documents/{ids[2]}").status_code == 202
    stack.drain(lambda: stack.status(ids[2])["status"] == "forgotten" and stack.idle(ns))
    assert stack.store.manifest(ns, 5).parent == 1
    kept = [d for d in docs if d.id != ids[2]]
    assert_same(stack.weights(ns, 5), stack.replay(kept, lr, **rehearsal))
    assert [e.id for e in _memory(stack, ns, 5)] == [d.id for d in kept]
    assert TEXTS[2] not in (stack.store.path(ns, 5) / REHEARSAL_FILE).read_text()
    assert TEXTS[2] in (stack.store.path(ns, 4) / REHEARSAL_FILE).read_text()
    assert stack.store.verify(ns, 5)  # the memory is under the snapshot's checksum


def test_the_evals_options_reach_the_learner(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptation.lab import evaluation

    got: list[evaluation.EvalConfig] = []
    monkeypatch.setattr(evaluation, "run_eval", lambda *a, **k: got.append(a[3]) or {})
    monkeypatch.setattr(evaluation, "report_markdown", lambda _: "")
    argv = ["eval", "--data", "d.jsonl", "--out", "o", "--rehearse", "3"]
    args: argparse.Namespace = build_parser().parse_args([*argv, "--rehearsal-window", "5"])
    assert args.handler(args) == 0
    cfg = evaluation.EvalConfig(device="cpu", learning=got[0].learning)
    method = evaluation.make_method("uniform", str(tiny_model_dir), cfg, 1e-3, LORA_SEED, [])
    assert isinstance(method, evaluation.LoraMethod)
    learner = method.learner
    assert (learner.settings.rehearse, learner.memory.window) == (3, 5)
    learner.learn(Document("a", TEXTS[0]))
    assert learner.learn(Document("b", TEXTS[1])).rehearsed == 1
    method.reset()  # the single protocol's fresh start forgets what there was to rehearse
    assert len(learner.memory) == 0
    # Left out, the service's defaults hold.
    defaults = build_parser().parse_args(argv[:5])
    assert (defaults.rehearse, defaults.rehearsal_window) == (0, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:5], "--rehearse", "-1"])
