"""End to end: live API (uvicorn) + the `uptake worker` process + real Redis + a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.servicekit import isolated_settings, live_api, start_worker, stop_process, wait_until

NS = "e2e"


def _metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{namespace="{NS}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_documents_flow_into_answers(tmp_path: Path, tiny_model_dir: Path) -> None:
    with isolated_settings(tmp_path, tiny_model_dir, snapshot_every=6) as settings:
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            with live_api(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
                _run(http, worker_log=tmp_path / "worker.log")
            assert stop_process(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            stop_process(worker)


def _run(http: httpx.Client, worker_log: Path) -> None:
    texts = [
        f"Person {i} named Alda Venn{i} was born in Marrow Bay {i} in {1950 + i}."
        for i in range(20)
    ]
    batch = http.post(
        "/v1/documents", json={"documents": [{"text": t, "namespace": NS} for t in texts[:10]]}
    )
    assert batch.status_code == 202
    ids = [d["id"] for d in batch.json()["documents"]]
    for text in texts[10:]:
        response = http.post(
            "/v1/documents", json={"text": text, "namespace": NS, "source": "test"}
        )
        assert response.status_code == 202
        ids.append(response.json()["id"])
    assert len(set(ids)) == 20

    def all_applied() -> bool:
        return all(http.get(f"/v1/documents/{i}").json()["status"] == "applied" for i in ids)

    try:
        wait_until(all_applied, 180, interval=0.5, what="all 20 documents to be applied")
    except AssertionError:
        raise AssertionError(worker_log.read_text()[-3000:]) from None

    adapters = http.get("/v1/adapters", params={"namespace": NS}).json()
    versions = adapters["versions"]
    assert len(versions) >= 20 // 6 and versions[-1]["version"] >= 1
    assert sorted(d for v in versions for d in v["doc_ids"]) == sorted(ids)
    assert [v["parent"] for v in versions] == [0] + [v["version"] for v in versions[:-1]]
    status = http.get("/v1/status", params={"namespace": NS}).json()
    assert status["documents_applied"] == 20 and status["queue_length"] == 0
    assert status["published_version"] == versions[-1]["version"]

    # Read-your-writes: the answer comes from a version that holds the new document.
    fresh = http.post(
        "/v1/documents", json={"text": "Alda Venn moved to Port Selka.", "namespace": NS}
    )
    fresh_id = fresh.json()["id"]
    answer = http.post(
        "/v1/answer",
        json={
            "question": "Where does Alda Venn live?",
            "namespace": NS,
            "wait_for": [fresh_id],
            "timeout_s": 120,
        },
    )
    assert answer.status_code == 200, answer.text
    applied_in = http.get(f"/v1/documents/{fresh_id}").json()
    assert applied_in["status"] == "applied"
    assert (
        answer.json()["adapter_version"] >= applied_in["adapter_version"] > versions[-1]["version"]
    )
    assert answer.json()["namespace"] == NS

    metrics = http.get("/metrics").text
    assert _metric(metrics, "uptake_documents_received_total") == 21
    assert _metric(metrics, "uptake_documents_applied_total") == 21
    assert _metric(metrics, "uptake_documents_dead_total") == 0
    assert _metric(metrics, "uptake_tokens_trained_total") > 21
    assert _metric(metrics, "uptake_update_step_seconds_count") == 21
    assert _metric(metrics, "uptake_queue_lag") == 0
    assert _metric(metrics, "uptake_adapter_version") >= applied_in["adapter_version"]
    assert _metric(metrics, "uptake_answer_seconds_count") == 1
