"""Freshness on the demo model: time from POST to an answer from a version holding the document,
and worker throughput. A benchmark (slow): `pytest -m slow tests/test_freshness.py -s`."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import pytest

from adaptation.data import read_documents
from adaptation.metrics import best_f1
from adaptation.paths import demo_model_dir, demo_world_dir
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


@pytest.mark.slow
def test_freshness_and_throughput_on_the_demo_model(tmp_path: Path) -> None:
    stream = demo_world_dir() / "eval_stream.jsonl"
    if not (demo_model_dir() / "config.json").exists() or not stream.exists():
        pytest.skip("needs the demo model and world: run `uptake bootstrap` first")
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
            lora_rank=16,
            lora_alpha=32,
            max_doc_tokens=1024,
            snapshot_every=8,
            snapshot_seconds=SNAPSHOT_SECONDS,
            lease_seconds=15.0,
        )
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            with live_api(settings) as base, httpx.Client(base_url=base, timeout=300) as http:
                wait_until(lambda: http.get("/readyz").status_code == 200, 300, what="readiness")
                _measure(http, docs)
        finally:
            stop_process(worker)
            drop_prefix(url, prefix)


def _measure(http: httpx.Client, docs: list) -> None:
    latencies, f1s = [], []
    for doc in docs[:FRESHNESS_DOCS]:
        qa = doc.questions[0]
        started = time.perf_counter()
        posted = http.post("/v1/documents", json={"text": doc.text, "source": doc.id})
        assert posted.status_code == 202
        answer = http.post(
            "/v1/answer",
            json={"question": qa.question, "wait_for": [posted.json()["id"]], "timeout_s": 300},
        )
        latencies.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.text
        f1s.append(best_f1(answer.json()["answer"], qa.answers))
    cuts = statistics.quantiles(latencies, n=20)
    print(
        f"\nfreshness over {len(latencies)} documents posted one at a time "
        f"(UPTAKE_SNAPSHOT_SECONDS={SNAPSHOT_SECONDS:g}): p50 {statistics.median(latencies):.2f} s, "
        f"p95 {cuts[18]:.2f} s, max {max(latencies):.2f} s; answer F1 right after "
        f"{statistics.mean(f1s):.3f}"
    )

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
        f"throughput: {len(ids)} documents applied and published in {seconds:.1f} s "
        f"= {len(ids) / seconds:.2f} documents/s (snapshot every 8)"
    )
    status = http.get("/v1/status").json()
    assert status["documents_applied"] == FRESHNESS_DOCS + len(ids)
    assert status["dead_letters"] == 0
