"""Freshness on the demo model: time from POST to an answer that reflects the document (one of its
questions answered right where the base answered wrong), to any answer from a version holding it,
and worker throughput. A benchmark (slow): `pytest -m slow tests/test_freshness.py -s`."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import pytest

from adaptation.data import Document, read_documents
from adaptation.metrics import best_f1
from adaptation.paths import demo_model_dir, demo_weighter_dir, demo_world_dir
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

FRESHNESS_DOCS = 50
SNAPSHOT_SECONDS = 1.0
RIGHT = 0.5  # an answer with at least this F1 against a gold answer counts as right
# Each strategy at its best in the swept stream evaluation (docs/results/eval-camels-adam.md).
SETTINGS = {"uniform": {"lr": 2e-3, "steps_per_doc": 1}, "camels": {"lr": 5e-4, "steps_per_doc": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SETTINGS)
def test_freshness_and_throughput_on_the_demo_model(tmp_path: Path, strategy: str) -> None:
    stream = demo_world_dir() / "eval_stream.jsonl"
    if not (demo_model_dir() / "config.json").exists() or not stream.exists():
        pytest.skip("needs the demo model and world: run `uptake bootstrap` first")
    if strategy == "camels" and not demo_weighter_dir().is_dir():
        pytest.skip("needs the demo weighting model: run `uptake bootstrap` first")
    docs = [d for d in read_documents(stream) if d.questions]
    assert len(docs) >= FRESHNESS_DOCS + 8
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        settings = make_settings(
            demo_model_dir(),
            tmp_path / "store",
            url,
            prefix,
            device=None,
            strategy=strategy,
            lora_rank=16,
            lora_alpha=32,
            max_doc_tokens=1024,
            snapshot_every=8,
            snapshot_seconds=SNAPSHOT_SECONDS,
            lease_seconds=15.0,
            **SETTINGS[strategy],
        )
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            with live_api(settings) as base, httpx.Client(base_url=base, timeout=300) as http:
                wait_until(lambda: http.get("/readyz").status_code == 200, 300, what="readiness")
                _measure(http, docs, strategy)
        finally:
            stop_process(worker)
            drop_prefix(url, prefix)


def _answer(http: httpx.Client, question: str, wait_for: str | None = None) -> str:
    body: dict[str, object] = {"question": question, "timeout_s": 300}
    if wait_for is not None:
        body["wait_for"] = [wait_for]
    answer = http.post("/v1/answer", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["answer"]


def _right(doc: Document, answers: list[str]) -> list[bool]:
    return [best_f1(a, qa.answers) >= RIGHT for a, qa in zip(answers, doc.questions, strict=True)]


def _quantiles(seconds: list[float]) -> str:
    if len(seconds) < 2:
        return "too few to say"
    cuts = statistics.quantiles(seconds, n=20)
    return f"p50 {statistics.median(seconds):.2f} s, p95 {cuts[18]:.2f} s"


def _measure(http: httpx.Client, docs: list[Document], strategy: str) -> None:
    measured = docs[:FRESHNESS_DOCS]
    on_base = [
        _right(doc, [_answer(http, qa.question) for qa in doc.questions]) for doc in measured
    ]
    held, reflected = [], []
    for doc, base_right in zip(measured, on_base, strict=True):
        started = time.perf_counter()
        posted = http.post("/v1/documents", json={"text": doc.text, "source": doc.id})
        assert posted.status_code == 202
        first, *others = (qa.question for qa in doc.questions)
        answers = [_answer(http, first, wait_for=posted.json()["id"])]
        held.append(time.perf_counter() - started)
        answers += [_answer(http, q) for q in others]  # from the version waited for, or later
        now_right = _right(doc, answers)
        if any(now and not before for now, before in zip(now_right, base_right, strict=True)):
            reflected.append(time.perf_counter() - started)
    print(
        f"\n{strategy} (lr {SETTINGS[strategy]['lr']:g} x {SETTINGS[strategy]['steps_per_doc']}), "
        f"{len(measured)} documents posted one at a time "
        f"(UPTAKE_SNAPSHOT_SECONDS={SNAPSHOT_SECONDS:g}):\n"
        f"  POST to an answer from a version holding the document: {_quantiles(held)}\n"
        f"  documents whose answers then reflect them (a question right that the base got "
        f"wrong): {len(reflected)} of {len(measured)}\n"
        f"  POST to those answers: {_quantiles(reflected)}"
    )
    assert reflected, "no document's answers reflected it: the service learned nothing"

    batch = [{"text": d.text, "source": d.id} for d in docs[FRESHNESS_DOCS : FRESHNESS_DOCS + 64]]
    started = time.perf_counter()
    ids = [
        d["id"] for d in http.post("/v1/documents", json={"documents": batch}).json()["documents"]
    ]

    def applied() -> bool:  # one cheap request per poll, so polling does not slow the worker
        return http.get("/v1/status").json()["documents_applied"] == FRESHNESS_DOCS + len(ids)

    wait_until(applied, 600, interval=0.25, what="the batch to be applied")
    seconds = time.perf_counter() - started
    print(
        f"  throughput: {len(ids)} documents applied and published in {seconds:.1f} s "
        f"= {len(ids) / seconds:.2f} documents/s (snapshot every 8)"
    )
    status = http.get("/v1/status").json()
    assert status["documents_applied"] == FRESHNESS_DOCS + len(ids)
    assert status["dead_letters"] == 0
