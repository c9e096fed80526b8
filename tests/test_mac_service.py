"""Mode mac through the service: banks as snapshots, per-namespace serving, restarts, and the
startup check, on a tiny base with tiny untrained MAC networks, real Redis and real HTTP."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from adaptation.answering import generate_answers
from adaptation.data import Document
from adaptation.mac.bank import MemoryBank
from adaptation.mac.system import BANK, BankMismatch, MacSystem
from adaptation.modeling import load_base
from adaptation.paths import demo_mac_dir, demo_model_dir
from adaptation.retrieval import embed
from adaptation.weighting import make_weighter
from service.adapters import AdapterStore, publish_version
from service.backends import open_backends
from service.backends.mac import MacBackend, MacModels, check_banks
from service.cli import main
from service.engine import MacServingEngine, open_engine
from service.keys import Keys
from service.redis_conn import client
from service.settings import ConfigError, Settings
from tests.servicekit import (
    drop_prefix,
    live_api,
    make_settings,
    redis_for_tests,
    start_worker,
    stop_process,
    unique_prefix,
    wait_until,
)

NS = "macns"
QUESTION = "Where was Alda Venn born?"
NAMESPACES = ("alpha", "beta", "default")  # default publishes nothing: the bare base answers
DOCS = [
    "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works.",
    "The weather in Port Selka stayed mild, said 42 residents on Tuesday.",
    "Super Bowl 50 was an American football game played on February 7, 2016.",
    "Orla Quist moved from Tarn Ridge to Vellum Point in 2019.",
    "Quillon Works was founded in 1932 and has its headquarters in Marrow Bay.",
]


def mac_settings(
    model_dir: Path,
    mac_dir: Path,
    tmp: Path,
    url: str,
    prefix: str,
    top_k: int = 0,
    min_similarity: float = -1.0,
) -> Settings:
    return make_settings(
        model_dir,
        tmp / "store",
        url,
        prefix,
        mode="mac",
        mac_dir=mac_dir,
        mac_top_k=top_k,
        mac_min_similarity=min_similarity,
        snapshot_every=3,
        answer_wait_ms=50,
    )


def test_mac_mode_without_trained_networks_stops_at_start(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unset = Settings(model=str(tiny_model_dir), mode="mac")
    with pytest.raises(ConfigError, match="needs UPTAKE_MAC_DIR"):
        unset.check()
    missing = unset.model_copy(update={"mac_dir": tmp_path / "nothing"})
    with pytest.raises(ConfigError, match="meta-train mac"):
        open_backends(missing, make_weighter("uniform"))
    Settings(model=str(tiny_model_dir)).check()  # lora needs no MAC directory

    monkeypatch.setenv("UPTAKE_MODE", "mac")
    monkeypatch.setenv("UPTAKE_MAC_DIR", str(tmp_path / "nothing"))
    for command in ("worker", "serve", "up"):
        assert main([command, "--model", str(tiny_model_dir)]) == 2
        err = capsys.readouterr().err
        assert f"uptake {command}: UPTAKE_MAC_DIR={tmp_path / 'nothing'}" in err
        assert "uptake meta-train mac" in err


def test_the_demo_model_finds_the_demo_mac_networks(
    tmp_path: Path, tiny_mac_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the demo model and no UPTAKE_MAC_DIR, mode mac uses the networks `uptake bootstrap`
    builds beside it, and says how to build them while they are missing."""
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    settings = Settings(model=str(demo_model_dir()), mode="mac")
    with pytest.raises(ConfigError, match="demo MAC directory .*uptake bootstrap"):
        settings.check()
    shutil.copytree(tiny_mac_dir, demo_mac_dir())
    settings.check()
    assert settings.mac_networks() == demo_mac_dir()
    with pytest.raises(ConfigError, match="needs UPTAKE_MAC_DIR"):  # another base: not these
        settings.model_copy(update={"model": str(tmp_path / "other")}).check()


def test_bank_backend_snapshots_reopens_and_drops(
    tmp_path: Path, tiny_model_dir: Path, tiny_mac_dir: Path
) -> None:
    settings = make_settings(
        tiny_model_dir, tmp_path, "redis://unused", "p", mode="mac", mac_dir=tiny_mac_dir
    )
    models = open_backends(settings, make_weighter("uniform"))
    assert isinstance(models, MacModels)
    backend = models.open(NS, None, settings)
    for i, text in enumerate(DOCS[:3]):
        assert backend.ingest(Document(f"d{i}", text)).applied
    assert backend.ingest(Document("d0", DOCS[0])).applied  # a repeat is already learned
    assert backend.system.bank.ids == ["d0", "d1", "d2"]
    backend.write_state(tmp_path / "snap")

    reopened = models.open(NS, tmp_path / "snap", settings)
    assert isinstance(reopened, MacBackend)
    assert reopened.system.networks is backend.system.networks  # shared, only banks differ
    assert torch.equal(reopened.system.bank.tensor(), backend.system.bank.tensor())
    assert reopened.answer([QUESTION]) == backend.answer([QUESTION])
    assert reopened.drop("d1") and not reopened.drop("d1")
    assert reopened.system.bank.ids == ["d0", "d2"]
    assert backend.system.bank.ids == ["d0", "d1", "d2"]


def test_a_bank_of_other_networks_is_refused_at_start(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_mac_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(
        tiny_model_dir, tmp_path / "store", "redis://unused", "p", mode="mac", mac_dir=tiny_mac_dir
    )
    models = MacModels.load(settings)
    store = AdapterStore(settings.adapters_dir())
    own = models.open("mine", None, settings)
    own.ingest(Document("d0", DOCS[0]))
    store.write("mine", 0, ["d0"], 1, own.write_state)
    check_banks(settings)  # the networks' own bank passes

    alien = MemoryBank(*own.system.bank.tensor().shape[1:], networks="0123456789abcdef")
    alien.append("x", own.system.bank.tensor()[0])
    store.write(NS, 0, ["x"], 1, lambda d: alien.save(d / BANK))
    with pytest.raises(BankMismatch, match="written by MAC networks 0123456789abcdef"):
        models.system(store.path(NS, 1))  # what the worker and engine would open
    monkeypatch.setenv("UPTAKE_MODE", "mac")
    monkeypatch.setenv("UPTAKE_MAC_DIR", str(tiny_mac_dir))
    monkeypatch.setenv("UPTAKE_STORE_DIR", str(tmp_path / "store"))
    capsys.readouterr()
    for command in ("worker", "serve", "up"):
        assert main([command, "--model", str(tiny_model_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"uptake {command}: namespace '{NS}'")
        assert "written by MAC networks 0123456789abcdef" in err and "UPTAKE_MAC_DIR" in err


def test_mac_rag_engine_answers_from_the_retrieved_entries_only(
    tmp_path: Path, tiny_model_dir: Path, tiny_mac_dir: Path
) -> None:
    system, version, [(served, answered)] = _served_from_a_bank(
        tmp_path, tiny_model_dir, tiny_mac_dir, [QUESTION], top_k=1
    )
    assert answered == version
    assert system.bank.keyed and system.retrieve([QUESTION]) == [["alpha-0"]]  # Alda Venn's
    (retrieved,) = system.answer([QUESTION], doc_ids=[["alpha-0"]], max_new_tokens=6)
    assert served == retrieved
    system.top_k = 0
    assert system.answer([QUESTION], max_new_tokens=6) != [served]  # the whole bank differs


def test_a_gated_mac_engine_leaves_a_question_about_nothing_in_the_bank_to_the_base(
    tmp_path: Path, tiny_model_dir: Path, tiny_mac_dir: Path
) -> None:
    stranger = "What is the boiling point of water at sea level?"
    system, _, [(known, _), (unknown, _)] = _served_from_a_bank(
        tmp_path, tiny_model_dir, tiny_mac_dir, [QUESTION, stranger], min_similarity=0.3
    )
    assert system.min_similarity == 0.3 and system.retrieve([stranger]) == [[]]
    plain = generate_answers(system.base, system.tokenizer, [stranger], max_new_tokens=6)
    assert unknown == plain[0]
    (whole_bank,) = system.answer([stranger], doc_ids=[system.bank.ids], max_new_tokens=6)
    assert whole_bank != unknown  # ungated, the bank would have changed the answer
    (near,) = system.retrieve([QUESTION])
    assert "alpha-0" in near and len(near) < len(DOCS)  # Alda Venn's, not the whole bank
    assert known == system.answer([QUESTION], doc_ids=[near], max_new_tokens=6)[0]


def _served_from_a_bank(
    tmp_path: Path, model_dir: Path, mac_dir: Path, questions: list[str], **retrieval: Any
) -> tuple[MacSystem, int, list[tuple[str, int]]]:
    """Publish a bank of DOCS in namespace alpha, ask a mac engine (with the given retrieval
    settings) each question, and return that version's system, the version and the answers."""
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        settings = mac_settings(model_dir, mac_dir, tmp_path, url, prefix, **retrieval)
        models = MacModels.load(settings)
        r = client(url)
        store = AdapterStore(settings.adapters_dir())
        engine = open_engine(settings, r, Keys(prefix), store)
        try:
            version = _publish_bank(settings, models, r, "alpha", DOCS)
            engine.load()
            engine.refresh()
            answers = [engine.answer(q, "alpha", 6) for q in questions]
        finally:
            engine.stop()
            drop_prefix(url, prefix)
            r.close()
    return models.system(store.path("alpha", version)), version, answers


def _publish_bank(
    settings: Settings, models: MacModels, r: redis.Redis, namespace: str, texts: list[str]
) -> int:
    """Snapshot a bank holding `texts` as the namespace's next version, and publish it."""
    store = AdapterStore(settings.adapters_dir())
    backend = models.open(namespace, None, settings)
    for i, text in enumerate(texts):
        backend.ingest(Document(f"{namespace}-{i}", text))
    manifest = store.write(namespace, store.latest(namespace), [], 0, backend.write_state)
    keys = Keys(settings.redis_prefix)
    r.sadd(keys.namespaces, namespace)
    publish_version(r, keys, namespace, manifest.version)
    return manifest.version


def test_engine_answers_each_namespace_from_its_bank_and_follows_new_versions(
    tmp_path: Path, tiny_model_dir: Path, tiny_mac_dir: Path
) -> None:
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        settings = mac_settings(tiny_model_dir, tiny_mac_dir, tmp_path, url, prefix)
        models = MacModels.load(settings)
        r = client(url)
        sizes: list[int] = []
        store = AdapterStore(settings.adapters_dir())
        engine = open_engine(settings, r, Keys(prefix), store, on_batch=sizes.append)
        assert isinstance(engine, MacServingEngine)
        try:
            _publish_bank(settings, models, r, "alpha", DOCS[:2])
            _publish_bank(settings, models, r, "beta", DOCS[2:])
            engine.load()
            engine.refresh()
            assert engine.versions() == {"alpha": 1, "beta": 1}
            asks = [(f"Where does person {i} live?", ns) for i in range(4) for ns in NAMESPACES]
            sequential = [engine.answer(q, ns, 6) for q, ns in asks]
            sizes.clear()
            with ThreadPoolExecutor(len(asks)) as pool:
                concurrent = list(pool.map(lambda a: engine.answer(a[0], a[1], 6), asks))

            assert _publish_bank(settings, models, r, "alpha", DOCS) == 2
            engine.refresh()
            assert engine.version("alpha") == 2
            assert engine.answer(QUESTION, "alpha", 6)[1] == 2

            # A snapshot that passes its checksum but cannot be loaded keeps the old version.
            alien = MemoryBank(3, 5)
            alien.append("x", torch.zeros(3, 5))
            bad = store.write("beta", 1, ["x"], 1, lambda d: alien.save(d / BANK))
            publish_version(r, Keys(prefix), "beta", bad.version)
            engine.refresh()
            assert engine.version("beta") == 1
            assert engine.answer(QUESTION, "beta", 6)[1] == 1
        finally:
            engine.stop()
            drop_prefix(url, prefix)
            r.close()
    assert concurrent == sequential
    assert len(sizes) < len(asks) / 2 and max(sizes) > 1, sizes
    assert [v for _, v in sequential] == [0 if ns == "default" else 1 for _, ns in asks]
    by_ns = {ns: [t for (t, _), (_, n) in zip(sequential, asks) if n == ns] for ns in NAMESPACES}
    assert by_ns["alpha"] != by_ns["beta"] != by_ns["default"]
    base, tok = load_base(tiny_model_dir, device="cpu")
    questions = [q for q, ns in asks if ns == "default"]
    assert by_ns["default"] == generate_answers(base, tok, questions, max_new_tokens=6)


def test_mac_mode_end_to_end_survives_a_worker_restart(
    tmp_path: Path, tiny_model_dir: Path, tiny_mac_dir: Path
) -> None:
    log = tmp_path / "worker.log"
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        settings = mac_settings(tiny_model_dir, tiny_mac_dir, tmp_path, url, prefix, top_k=2)
        store = AdapterStore(settings.adapters_dir())
        worker = start_worker(settings, log)
        try:
            with live_api(settings) as api, httpx.Client(base_url=api, timeout=180) as http:
                wait_until(lambda: http.get("/readyz").status_code == 200, 120, what="readiness")
                empty = _answer(http, NS, [])
                base, tok = load_base(tiny_model_dir, device="cpu")
                (plain,) = generate_answers(base, tok, [QUESTION], max_new_tokens=8)
                assert empty == {**empty, "answer": plain, "adapter_version": 0}

                batch = http.post(
                    "/v1/documents",
                    json={"documents": [{"text": t, "namespace": NS} for t in DOCS[:4]]},
                )
                assert batch.status_code == 202, batch.text
                ids = [d["id"] for d in batch.json()["documents"]]
                last = _answer(http, NS, ids, log)
                assert last["answer"] != empty["answer"]  # memory now changes what the base says
                versions = http.get("/v1/adapters", params={"namespace": NS}).json()["versions"]
                assert versions[-1]["version"] == last["adapter_version"] >= 2  # 3 + 1 documents
                assert sorted(d for v in versions for d in v["doc_ids"]) == sorted(ids)
                assert {v["info"]["mode"] for v in versions} == {"mac"}
                assert _bank(store, last["adapter_version"]).ids == _lineage_order(versions)
                assert _answer(http, "elsewhere", [])["answer"] == empty["answer"]
                status = http.get("/v1/status", params={"namespace": NS}).json()
                four = status["state_bytes"]
                assert four == store.nbytes(NS, status["published_version"]) > 0
                held = _bank(store, status["published_version"])
                assert status["bank_entries"] == 4 and held.keyed
                assert status["bytes_per_document"] == held.entry_nbytes

                assert stop_process(worker) == 0, log.read_text()[-3000:]
                worker = start_worker(settings, log)
                fresh = http.post("/v1/documents", json={"text": DOCS[4], "namespace": NS})
                after = _answer(http, NS, [fresh.json()["id"]], log)
                assert after["adapter_version"] > last["adapter_version"]
                bank = _bank(store, after["adapter_version"])
                assert bank.ids == [*_lineage_order(versions), fresh.json()["id"]]
                assert bank.num_entries == 5 and bank.keyed  # keys survive the restart
                assert bank.search(embed([DOCS[4]]), 1) == [[fresh.json()["id"]]]
                status = http.get("/v1/status", params={"namespace": NS}).json()
                assert status["state_bytes"] > four  # the bank grows by one entry

                done = http.post(
                    "/v1/completions", json={"model": NS, "prompt": "Alda Venn", "max_tokens": 4}
                )
                assert done.status_code == 200, done.text
                assert done.json()["adapter_version"] == after["adapter_version"]
            assert stop_process(worker) == 0, log.read_text()[-3000:]
        finally:
            stop_process(worker)
            drop_prefix(url, prefix)


def _answer(
    http: httpx.Client, namespace: str, wait_for: list[str], log: Path | None = None
) -> dict[str, Any]:
    """Ask QUESTION once `wait_for` is applied, and check the answer's version holds it."""
    response = http.post(
        "/v1/answer",
        json={
            "question": QUESTION,
            "namespace": namespace,
            "max_new_tokens": 8,
            "wait_for": wait_for,
            "timeout_s": 120,
        },
    )
    assert response.status_code == 200, (response.text, log.read_text()[-3000:] if log else "")
    body = response.json()
    for doc_id in wait_for:  # read-your-writes: the answer's version holds every document
        record = http.get(f"/v1/documents/{doc_id}").json()
        assert record["status"] == "applied"
        assert body["adapter_version"] >= record["adapter_version"]
    return body


def _bank(store: AdapterStore, version: int) -> MemoryBank:
    assert store.verify(NS, version)
    return MemoryBank.load(store.path(NS, version) / BANK)


def _lineage_order(versions: list[dict[str, Any]]) -> list[str]:
    """Document ids in the order the worker appended them to the bank."""
    return [d for v in versions for d in v["doc_ids"]]
