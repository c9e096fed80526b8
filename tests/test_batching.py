"""Micro-batched answering: concurrent questions share generate calls and get their own answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.batching import AnswerBatcher
from tests.servicekit import (
    drop_prefix,
    live_api,
    make_settings,
    redis_for_tests,
    unique_prefix,
    wait_until,
)


def test_concurrent_questions_are_grouped_by_namespace_and_routed_back() -> None:
    calls: list[tuple[str, list[str]]] = []
    gate = threading.Event()

    def run_batch(namespace: str, questions: list[str], budget: int) -> tuple[list[str], int]:
        gate.wait(5)  # hold the first call so the others pile up behind it
        calls.append((namespace, questions))
        return [f"{namespace}:{q}" for q in questions], len(calls)

    batcher = AnswerBatcher(run_batch, max_batch=64, max_wait=0.05)
    asks = [(f"q{i}", "a" if i % 2 else "b") for i in range(24)]
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = [pool.submit(batcher.answer, q, ns, 8) for q, ns in asks]
        time.sleep(0.3)
        gate.set()
        results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [text for text, _ in results] == [f"{ns}:{q}" for q, ns in asks]
    assert all({ns} == {n for n, _ in calls if n == ns} for _, ns in asks)
    assert sum(len(qs) for _, qs in calls) == len(asks)
    assert len(calls) < len(asks) / 2, calls


def test_a_failing_batch_fails_its_callers_and_the_batcher_lives_on() -> None:
    def run_batch(namespace: str, questions: list[str], budget: int) -> tuple[list[str], int]:
        if "boom" in questions:
            raise RuntimeError("generation failed")
        return list(questions), 0

    batcher = AnswerBatcher(run_batch, max_batch=8, max_wait=0.0)
    with pytest.raises(RuntimeError, match="generation failed"):
        batcher.answer("boom", "default", 8)
    assert batcher.answer("fine", "default", 8) == ("fine", 0)
    batcher.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("batching")
    with redis_for_tests(tmp) as url:
        prefix = unique_prefix()
        settings = make_settings(tiny_model_dir, tmp / "store", url, prefix, answer_wait_ms=50)
        with live_api(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
            wait_until(lambda: http.get("/readyz").status_code == 200, 60, what="readiness")
            yield http
        drop_prefix(url, prefix)


def _batch_sizes(http: httpx.Client) -> tuple[float, float]:
    """(generate calls, questions) from the batch-size histogram on /metrics."""
    lines = http.get("/metrics").text.splitlines()
    value = {
        line.split()[0]: float(line.split()[1])
        for line in lines
        if line.startswith("uptake_answer_batch_size_")
    }
    return value.get("uptake_answer_batch_size_count", 0.0), value.get(
        "uptake_answer_batch_size_sum", 0.0
    )


def test_concurrent_http_answers_match_sequential_ones_in_fewer_calls(api: httpx.Client) -> None:
    questions = [f"Where does person {i} live?" for i in range(16)]

    def ask(q: str) -> str:
        r = api.post("/v1/answer", json={"question": q, "max_new_tokens": 6})
        assert r.status_code == 200, r.text
        return r.json()["answer"]

    sequential = [ask(q) for q in questions]
    calls_before, asked_before = _batch_sizes(api)
    with ThreadPoolExecutor(len(questions)) as pool:
        concurrent = list(pool.map(ask, questions))
    calls, asked = _batch_sizes(api)
    assert concurrent == sequential
    assert asked - asked_before == len(questions)
    assert calls - calls_before < len(questions) / 2
