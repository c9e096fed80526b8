"""The worker in-process: snapshots, resume, exactly-once, retries and dead letters, leases."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from adaptation.modeling import lora_parameters
from adaptation.paths import demo_weighter_dir
from adaptation.weighting.camels import CamelsSpec, CamelsWeighter
from service.backends.lora import LoraBackend, build_weighter
from service.cli import main
from service.documents import DocumentStore
from service.keys import Keys
from service.metrics import WorkerStats
from service.queue import Queue
from service.redis_conn import client
from service.settings import Settings
from service.worker import Worker
from tests.servicekit import (
    drop_prefix,
    make_settings,
    open_stack,
    redis_for_tests,
    unique_prefix,
    wait_until,
)


class PoisonWeighter:
    """Uniform weights, except NaN for documents containing POISON: their update must be refused."""

    name = "poison"

    def char_weights(self, text: str) -> np.ndarray:
        fill = np.nan if "POISON" in text else 1.0
        return np.full(len(text), fill, dtype=np.float32)


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Settings]:
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        yield make_settings(tiny_model_dir, tmp_path / "store", url, prefix, worker_id="w1")
        drop_prefix(url, prefix)


def _docs(s: Settings) -> DocumentStore:
    return DocumentStore(client(s.redis_url or ""), Keys(s.redis_prefix))


def _drain(worker: Worker, done: object, timeout: float = 60) -> None:
    def step() -> object:
        worker.run_once()
        return done() if callable(done) else done

    wait_until(step, timeout, interval=0, what="the worker to finish")


def _all_applied(docs: DocumentStore, ids: list[str]):
    return lambda: all(r and r.status == "applied" for r in docs.statuses(ids).values())


def test_documents_are_snapshotted_published_and_acked(settings: Settings) -> None:
    docs = _docs(settings)
    ids = [
        docs.submit(f"Person {i} was born in Town {i} in {1900 + i}.", "ns").id for i in range(10)
    ]
    worker = Worker(settings, weighter=PoisonWeighter())
    _drain(worker, _all_applied(docs, ids))
    store = worker.store
    manifests = store.manifests("ns")
    assert [m.version for m in manifests][:2] == [1, 2]
    assert len(manifests[0].doc_ids) == settings.snapshot_every
    applied = [d for m in manifests for d in m.doc_ids]
    assert sorted(applied) == sorted(ids)
    assert all(store.verify("ns", m.version) for m in manifests)
    assert (store.path("ns", 1) / "optimizer.pt").exists()
    assert (store.path("ns", 1) / "adapter_config.json").exists()
    assert worker.redis.get(worker.keys.version("ns")) == str(manifests[-1].version)
    depth = Queue(worker.redis, worker.keys).depth("ns")
    assert (depth.length, depth.pending) == (0, 0)
    versions = {docs.get(i).adapter_version for i in ids}
    assert versions <= {m.version for m in manifests}
    stats = worker.redis.hgetall(worker.keys.stats("ns"))
    assert stats["applied"] == "10" and stats["received"] == "10" and int(stats["tokens"]) > 0
    worker.shutdown()


def test_a_backlog_read_in_one_turn_is_snapshotted_on_time(settings: Settings) -> None:
    """The snapshot period holds within a turn: a backlog read at once is not learned to its end
    before the first of it is published."""
    settings = settings.model_copy(update={"snapshot_every": 100, "snapshot_seconds": 1e-6})
    docs = _docs(settings)
    ids = [docs.submit(f"Person {i} lives in Town {i}.", "ns").id for i in range(4)]
    worker = Worker(settings, weighter=PoisonWeighter())
    worker.run_once()  # reads all four entries in one turn
    _drain(worker, _all_applied(docs, ids))
    assert [docs.get(i).adapter_version for i in ids] == [1, 2, 3, 4]
    worker.shutdown()


def test_resume_restores_state_and_skips_documents_in_the_lineage(settings: Settings) -> None:
    docs = _docs(settings)
    ids = [docs.submit(f"Fact {i}: the river Oss flows past Hale {i}.", "ns").id for i in range(4)]
    first = Worker(settings, weighter=PoisonWeighter())
    _drain(first, _all_applied(docs, ids))
    backend = first.namespaces["ns"].backend
    assert isinstance(backend, LoraBackend)
    weights = {k: v.detach().clone() for k, v in lora_parameters(backend.model).items()}
    steps = backend.learner.updater.steps_applied
    first.shutdown()

    # A crash between snapshot and acknowledgement: an entry for an applied document is pending.
    keys = first.keys
    first.redis.xadd(keys.stream("ns"), {"id": ids[0]})
    Queue(first.redis, keys).read(["ns"], "crashed-worker", 10, None)
    attempts = docs.get(ids[0]).attempts

    second = Worker(settings.model_copy(update={"worker_id": "w2"}), weighter=PoisonWeighter())
    second.run_once()
    resumed = second.namespaces["ns"].backend
    assert isinstance(resumed, LoraBackend)
    restored = lora_parameters(resumed.model)
    assert len(restored) == len(weights)
    for (_, before), (_, after) in zip(
        sorted(weights.items()), sorted(restored.items()), strict=True
    ):
        torch.testing.assert_close(before, after)
    assert resumed.learner.updater.steps_applied == steps
    assert resumed.learner.updater.optimizer.state_dict()["state"]
    _drain(second, lambda: Queue(second.redis, keys).depth("ns").length == 0)
    assert docs.get(ids[0]).attempts == attempts  # skipped, not applied again
    assert second.store.latest("ns") == first.store.latest("ns")
    second.shutdown()


def test_failing_document_is_retried_then_dead_lettered(settings: Settings) -> None:
    docs = _docs(settings)
    good = docs.submit("Alda Venn works for Quillon Works.", "ns").id
    bad = docs.submit("POISON document that makes the loss NaN.", "ns").id
    worker = Worker(settings, weighter=PoisonWeighter())
    _drain(worker, lambda: docs.get(bad).status == "dead" and docs.get(good).status == "applied")
    record = docs.get(bad)
    assert record.attempts == settings.max_deliveries
    assert "nan" in (record.error or "").lower()
    (letter,) = Queue(worker.redis, worker.keys).dead_letters("ns")
    assert letter["id"] == bad and "nan" in letter["reason"].lower()
    stats = worker.redis.hgetall(worker.keys.stats("ns"))
    assert (stats["failed"], stats["dead"]) == (str(settings.max_deliveries), "1")
    assert bad not in worker.store.lineage("ns", worker.store.latest("ns"))
    worker.shutdown()


def _holds_unsaved(worker: Worker, doc_id: str) -> bool:
    st = worker.namespaces.get("ns")
    return st is not None and doc_id in st.unsaved


def test_a_worker_killed_before_its_snapshot_does_not_count_against_what_it_learned(
    settings: Settings,
) -> None:
    """Crashes between learning a document and snapshotting it are the worker's failure, not the
    document's: however many there are, it is not dead-lettered, and it ends up applied once."""
    settings = settings.model_copy(update={"snapshot_every": 100, "snapshot_seconds": 1e6})
    docs = _docs(settings)
    doc_id = docs.submit("Orla Penn founded Tessel Yard in 1911.", "ns").id
    for crash in range(settings.max_deliveries + 1):
        worker = Worker(
            settings.model_copy(update={"worker_id": f"crashed-{crash}"}), weighter=PoisonWeighter()
        )
        _drain(worker, lambda w=worker: _holds_unsaved(w, doc_id))
        assert docs.get(doc_id).attempts == 0  # learned: the attempt is not held against it
        worker.redis.delete(worker.keys.lease("ns"))  # it dies; its lease lapses
    last = Worker(settings.model_copy(update={"worker_id": "last"}), weighter=PoisonWeighter())
    _drain(last, lambda: _holds_unsaved(last, doc_id))
    last.shutdown()  # snapshots what it learned
    record = docs.get(doc_id)
    assert (record.status, record.attempts, record.trust) == ("applied", 0, 1.0)
    assert last.store.lineage("ns", last.store.latest("ns")) == {doc_id: 1}


def test_a_second_worker_waits_for_the_lease(settings: Settings) -> None:
    docs = _docs(settings)
    docs.submit("Some text to learn.", "ns")
    owner = Worker(settings, weighter=PoisonWeighter())
    owner.run_once()
    other = Worker(settings.model_copy(update={"worker_id": "w2"}), weighter=PoisonWeighter())
    other.run_once()
    assert "ns" in owner.namespaces and "ns" not in other.namespaces
    owner.shutdown()  # hands the lease back
    other._discovered = 0.0
    other.run_once()
    assert "ns" in other.namespaces
    other.shutdown()


def test_stats_histogram_buckets(settings: Settings) -> None:
    r = client(settings.redis_url or "")
    stats = WorkerStats(r, Keys(settings.redis_prefix))
    stats.step("ns", 0.003, 10)
    stats.step("ns", 100.0, 5)
    h = r.hgetall(Keys(settings.redis_prefix).stats("ns"))
    assert h["step_bucket:0"] == "1" and h["tokens"] == "15"
    assert h["step_bucket:13"] == "1"


def test_entries_in_hand_survive_a_redis_error(settings: Settings) -> None:
    docs = _docs(settings)
    ids = [docs.submit(f"Transient fact {i}: Oda Lind keeps {i} goats.", "ns").id for i in range(3)]
    worker = Worker(settings, weighter=PoisonWeighter())
    real = worker.docs.begin_attempt
    calls = {"n": 0}

    def flaky(doc_id: str) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ConnectionError("simulated outage")
        return real(doc_id)

    worker.docs.begin_attempt = flaky  # type: ignore[method-assign]
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        wait_until(_all_applied(docs, ids), 60, what="every document applied after the outage")
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert calls["n"] >= 4
    assert sorted(worker.store.lineage("ns", worker.store.latest("ns"))) == sorted(ids)


def test_the_worker_applies_camels_weighted_updates_end_to_end(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """UPTAKE_STRATEGY=camels with UPTAKE_WEIGHTER=DIR: the weighting model's weights drive the
    update. A model that weighs every token ~0 leaves the adapter's B matrices at zero; the
    untrained one (every token ln2/beta) moves them."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_model_dir))
    spec = CamelsSpec(hidden=32, layers=1, heads=2, intermediate=64, head_hidden=16)
    texts = [f"Person {i} was born in Town {i} in {1900 + i}." for i in range(4)]
    moved: dict[str, float] = {}
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        for label, bias in (("silent", -40.0), ("untrained", 0.0)):
            weighter = CamelsWeighter(tokenizer, spec)
            torch.nn.init.constant_(weighter.head[-1].bias, bias)
            settings = make_settings(
                tiny_model_dir,
                tmp_path / "store",
                url,
                prefix,
                worker_id=label,
                strategy="camels",
                weighter=weighter.save(tmp_path / label),
            )
            docs = _docs(settings)
            ids = [docs.submit(t, label).id for t in texts]
            worker = Worker(settings)
            _drain(worker, _all_applied(docs, ids))
            worker.shutdown()
            latest = worker.store.latest(label)
            assert worker.store.manifest(label, latest).info["strategy"] == "camels"
            state = load_file(str(worker.store.path(label, latest) / "adapter_model.safetensors"))
            moved[label] = sum(float(v.abs().sum()) for k, v in state.items() if "lora_B" in k)
        drop_prefix(url, prefix)
    assert moved["silent"] == 0.0
    assert moved["untrained"] > 0.0


def test_a_strategy_without_its_weighter_stops_at_start(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """camels falls back to the demo weighting model and tfidf to nothing: without one, the
    processes exit at start saying what to build or set, before any model loads."""
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    cases = {
        ("camels", None): "`uptake bootstrap`",
        ("tfidf", None): "tfidf needs UPTAKE_WEIGHTER: the JSON file written by `uptake fit-tfidf",
        ("camels", tmp_path / "nothing"): f"UPTAKE_WEIGHTER={tmp_path / 'nothing'} does not exist",
    }
    for (strategy, weighter), message in cases.items():
        monkeypatch.setenv("UPTAKE_STRATEGY", strategy)
        if weighter is not None:
            monkeypatch.setenv("UPTAKE_WEIGHTER", str(weighter))
        for command in ("worker", "serve", "up"):
            assert main([command, "--model", str(tiny_model_dir)]) == 2
            assert message in capsys.readouterr().err
    monkeypatch.delenv("UPTAKE_WEIGHTER")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_model_dir))
    CamelsWeighter(tokenizer, CamelsSpec(hidden=32, layers=1, heads=2, intermediate=64)).save(
        demo_weighter_dir()
    )
    settings = Settings(model=str(tiny_model_dir), strategy="camels")
    settings.check()
    assert settings.weighter_path() == demo_weighter_dir()


def test_fit_tfidf_writes_the_weighter_the_tfidf_strategy_reads(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = [f"The council met on day {i} and the weather was mild." for i in range(20)]
    corpus.write_text(
        "".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(lines))
    )
    out = tmp_path / "tfidf.json"
    assert main(["fit-tfidf", str(corpus), "--out", str(out)]) == 0
    assert f"over 20 documents: {out}" in capsys.readouterr().out

    settings = Settings(model=str(tiny_model_dir), strategy="tfidf", weighter=out)
    settings.check()
    text = "The council met Orla Penn."
    weights = build_weighter(settings).char_weights(text)
    assert weights[text.index("Orla")] > weights[text.index("council")] > 0

    assert main(["fit-tfidf", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "no dataset at" in capsys.readouterr().err


def test_a_snapshot_the_store_cannot_write_is_reported_and_retried(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A store that refuses writes (here a file where the namespace's directory belongs) keeps
    the document queued, and /v1/status and /metrics say why, without naming any path."""
    with open_stack(tmp_path, tiny_model_dir, snapshot_every=1, snapshot_seconds=0.2) as stack:
        blocker = stack.settings.adapters_dir() / "stuck"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way")
        [doc] = stack.submit("stuck", ["Alda Venn works for Quillon Works."])

        def fails() -> bool:
            try:
                stack.worker.run_once()
            except FileExistsError:
                return True
            return False

        wait_until(fails, 60, interval=0, what="the snapshot to fail")
        status = stack.http.get("/v1/status", params={"namespace": "stuck"}).json()
        problem = status["worker_problem"]
        assert problem["reason"] == "cannot write a snapshot: File exists (errno 17)"
        assert str(tmp_path) not in str(status)
        assert stack.status(doc)["status"] == "queued" and status["published_version"] == 0
        assert 'uptake_worker_problem{namespace="stuck"} 1.0' in stack.http.get("/metrics").text
        # Retried, still failing (a snapshot written in the background fails on a later turn):
        # the first failure's time stays.
        wait_until(fails, 60, interval=0, what="the retried snapshot to fail too")
        again = stack.http.get("/v1/status", params={"namespace": "stuck"}).json()
        assert again["worker_problem"]["since"] == problem["since"]

        blocker.unlink()
        stack.drain(lambda: stack.applied([doc]))
        assert (
            stack.http.get("/v1/status", params={"namespace": "stuck"}).json()["worker_problem"]
            is None
        )
        assert 'uptake_worker_problem{namespace="stuck"} 0.0' in stack.http.get("/metrics").text
