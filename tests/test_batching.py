"""Micro-batched answering: concurrent questions share generate calls and get their own answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import torch

from adaptation.modeling import attach_lora, load_base, lora_parameters, save_adapter
from service.adapters import AdapterStore, publish_version
from service.batching import AnswerBatcher
from service.engine import ServingEngine
from service.keys import Keys
from service.redis_conn import client
from service.settings import Settings
from tests.servicekit import isolated_settings, serve


def test_concurrent_questions_share_calls_across_namespaces_and_are_routed_back() -> None:
    calls: list[list[tuple[str, str]]] = []
    gate = threading.Event()

    def run_batch(asks: list[tuple[str, str]], budget: int) -> list[tuple[str, int]]:
        gate.wait(5)  # hold the first call so the others pile up behind it
        calls.append(asks)
        return [(f"{ns}:{q}", len(calls)) for ns, q in asks]

    batcher = AnswerBatcher(run_batch, max_batch=64, max_wait=0.05)
    asks = [(f"q{i}", "a" if i % 2 else "b") for i in range(24)]
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = [pool.submit(batcher.answer, q, ns, 8) for q, ns in asks]
        time.sleep(0.3)
        gate.set()
        results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [text for text, _ in results] == [f"{ns}:{q}" for q, ns in asks]
    assert sum(len(c) for c in calls) == len(asks)
    assert len(calls) < len(asks) / 2, calls
    assert any(len({ns for ns, _ in c}) == 2 for c in calls)  # one call served both namespaces


def test_a_batch_gathers_while_questions_keep_coming_for_a_bounded_time() -> None:
    """Questions 30 ms apart join one batch though the last comes long after the first's 50 ms;
    a steady stream is still cut into batches, so none waits without end."""
    calls: list[int] = []

    def run_batch(asks: list[tuple[str, str]], budget: int) -> list[tuple[str, int]]:
        calls.append(len(asks))
        return [(q, 0) for _, q in asks]

    def ask_spaced(n: int) -> None:
        with ThreadPoolExecutor(n) as pool:
            futures = []
            for i in range(n):
                futures.append(pool.submit(batcher.answer, f"q{i}", "default", 8))
                time.sleep(0.03)
            for f in futures:
                f.result(timeout=10)

    batcher = AnswerBatcher(run_batch, max_batch=64, max_wait=0.05)
    ask_spaced(4)
    assert calls == [4]
    calls.clear()
    ask_spaced(24)  # the gathering stops MAX_GATHER_WAITS x 50 ms after the first question
    batcher.close()
    assert sum(calls) == 24 and len(calls) >= 2 and max(calls) <= 10, calls


def test_a_failing_batch_fails_its_callers_and_the_batcher_lives_on() -> None:
    def run_batch(asks: list[tuple[str, str]], budget: int) -> list[tuple[str, int]]:
        if any(q == "boom" for _, q in asks):
            raise RuntimeError("generation failed")
        return [(q, 0) for _, q in asks]

    batcher = AnswerBatcher(run_batch, max_batch=8, max_wait=0.0)
    with pytest.raises(RuntimeError, match="generation failed"):
        batcher.answer("boom", "default", 8)
    assert batcher.answer("fine", "default", 8) == ("fine", 0)
    batcher.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[httpx.Client]:
    with serve(tmp_path_factory.mktemp("batching"), tiny_model_dir, answer_wait_ms=50) as served:
        yield served.http


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


def _publish_random_adapter(
    settings: Settings, client: redis.Redis, namespace: str, seed: int, parent: int = 0
) -> None:
    """A LoRA adapter with large random weights, so its namespace answers differently,
    published as the version after `parent`."""
    model, _ = load_base(settings.model, "cpu")
    peft = attach_lora(model, settings.lora())
    torch.manual_seed(seed)
    for param in lora_parameters(peft).values():
        param.data.normal_(0, 0.5)
    store = AdapterStore(settings.adapters_dir())
    store.write(namespace, parent, [], 0, lambda d: save_adapter(peft, d))
    keys = Keys(settings.redis_prefix)
    client.sadd(keys.namespaces, namespace)
    publish_version(client, keys, namespace, parent + 1)


def test_one_generate_call_serves_several_namespaces_each_through_its_adapter(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with isolated_settings(tmp_path, tiny_model_dir, answer_wait_ms=50) as settings:
        r = client(settings.redis_url)
        for seed, ns in enumerate(("alpha", "beta")):
            _publish_random_adapter(settings, r, ns, seed)
        sizes: list[int] = []
        keys = Keys(settings.redis_prefix)
        engine = ServingEngine(
            settings, r, keys, AdapterStore(settings.adapters_dir()), on_batch=sizes.append
        )
        try:
            engine.load()
            engine.refresh()
            asks = [
                (f"Where does person {i} live?", ns)
                for i in range(6)
                for ns in ("alpha", "beta", "default")
            ]
            sequential = [engine.answer(q, ns, 6) for q, ns in asks]
            sizes.clear()
            with ThreadPoolExecutor(len(asks)) as pool:
                concurrent = list(pool.map(lambda a: engine.answer(a[0], a[1], 6), asks))
        finally:
            engine.stop()
            r.close()
    assert concurrent == sequential
    assert {v for (_, v), (_, ns) in zip(sequential, asks) if ns != "default"} == {1}
    by_ns = {
        ns: [t for (t, _), (_, n) in zip(sequential, asks) if n == ns]
        for ns in ("alpha", "beta", "default")
    }
    assert by_ns["alpha"] != by_ns["beta"] != by_ns["default"]  # each adapter does answer
    assert len(sizes) < len(asks) / 2 and max(sizes) > 1, sizes


def test_a_new_version_is_copied_into_the_served_adapter_unless_its_shape_changed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The hot swap copies weights into the layers already built when it can; either way each
    version answers exactly as an engine that loaded only it."""
    question = "Where does person 3 live?"
    with isolated_settings(tmp_path, tiny_model_dir) as settings:
        r = client(settings.redis_url)
        keys, store = Keys(settings.redis_prefix), AdapterStore(settings.adapters_dir())
        engine = ServingEngine(settings, r, keys, store)

        def alone() -> tuple[str, int]:
            fresh = ServingEngine(settings, r, keys, store)
            try:
                fresh.load()
                fresh.refresh()
                return fresh.answer(question, "alpha", 6)
            finally:
                fresh.stop()

        try:
            engine.load()
            _publish_random_adapter(settings, r, "alpha", seed=0)
            engine.refresh()
            first = engine.answer(question, "alpha", 6)
            layers = {id(m) for m in engine._peft.modules()}
            _publish_random_adapter(settings, r, "alpha", seed=1, parent=1)
            engine.refresh()
            second = engine.answer(question, "alpha", 6)
            assert second == alone() and second[1] == 2 and second[0] != first[0]
            assert {id(m) for m in engine._peft.modules()} == layers  # copied in place
            reshaped = settings.model_copy(update={"lora_rank": 4})
            _publish_random_adapter(reshaped, r, "alpha", seed=2, parent=2)
            engine.refresh()
            third = engine.answer(question, "alpha", 6)
            assert third == alone() and third[1] == 3
            [(_, config)] = engine._peft.peft_config.items()  # the old shape was deleted
            assert config.r == 4
        finally:
            engine.stop()
            r.close()
