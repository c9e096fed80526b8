"""The HTTP API over a live uvicorn: every bad-input case, and Redis going down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servicekit import api_client, disposable_redis, make_settings, serve, unique_prefix

MAX_CHARS = 200
MAX_BATCH = 5


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("api")
    with serve(tmp, tiny_model_dir, max_doc_chars=MAX_CHARS, max_batch=MAX_BATCH) as served:
        yield served.http


def _detail(response: httpx.Response) -> str:
    return str(response.json()["detail"])


def test_single_and_batch_documents_are_accepted(api: httpx.Client) -> None:
    one = api.post("/v1/documents", json={"text": "Alda Venn was born in Marrow Bay."})
    assert one.status_code == 202
    body = one.json()
    assert body["status"] == "queued" and body["namespace"] == "default" and body["id"]
    again = api.post("/v1/documents", json={"text": "Alda Venn was born in Marrow Bay."})
    assert again.status_code == 202 and again.json()["id"] == body["id"]
    batch = api.post(
        "/v1/documents",
        json={"documents": [{"text": "first", "namespace": "b"}, {"text": "second", "id": "my-2"}]},
    )
    assert batch.status_code == 202
    got = batch.json()["documents"]
    assert [d["namespace"] for d in got] == ["b", "default"] and got[1]["id"] == "my-2"
    status = api.get(f"/v1/documents/{body['id']}")
    assert status.status_code == 200
    assert status.json()["status"] == "queued" and status.json()["attempts"] == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"text": ""}, "empty"),
        ({"text": "   \n\t "}, "empty"),
        ({"text": 5}, "string"),
        ({"text": ["a"]}, "string"),
        ({}, "required"),
        ({"text": "ok", "namespace": "bad namespace!"}, "pattern"),
        ({"text": "ok", "id": "has spaces"}, "pattern"),
        ({"text": "ok", "metadata": "not an object"}, "dictionary"),
        ({"text": "ok", "colour": "blue"}, "not permitted"),
        ({"documents": []}, "at least 1"),
        ({"documents": [{"text": "fine"}, {"text": " "}]}, "empty"),
        ({"documents": "nope"}, "list"),
        ([{"text": "a list, not an object"}], "dictionary"),
    ],
)
def test_bad_documents_are_422(api: httpx.Client, body: object, needle: str) -> None:
    response = api.post("/v1/documents", json=body)
    assert response.status_code == 422, response.text
    assert needle in response.text


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"text": "unterminated',
        b"\xff\xfe{}",
        b'{"text": "\\ud800 lone surrogate"}',
        b"",
    ],
)
def test_invalid_json_or_utf8_is_422(api: httpx.Client, raw: bytes) -> None:
    response = api.post("/v1/documents", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_oversized_document_and_batch_are_413(api: httpx.Client) -> None:
    big = api.post("/v1/documents", json={"text": "x" * (MAX_CHARS + 1)})
    assert big.status_code == 413 and "UPTAKE_MAX_DOC_CHARS" in _detail(big)
    in_batch = api.post("/v1/documents", json={"documents": [{"text": "ok"}, {"text": "y" * 999}]})
    assert in_batch.status_code == 413 and "document 1" in _detail(in_batch)
    many = api.post(
        "/v1/documents", json={"documents": [{"text": f"d{i}"} for i in range(MAX_BATCH + 1)]}
    )
    assert many.status_code == 413 and "UPTAKE_MAX_BATCH" in _detail(many)
    huge = api.post("/v1/documents", content=b"x" * (MAX_CHARS * MAX_BATCH * 4 + (1 << 20) + 1))
    assert huge.status_code == 413 and "bytes" in _detail(huge)
    assert api.post("/v1/documents", json={"text": "z" * MAX_CHARS}).status_code == 202


def test_unknown_ids_are_404(api: httpx.Client) -> None:
    response = api.get("/v1/documents/no-such-doc")
    assert response.status_code == 404 and "no-such-doc" in _detail(response)
    waited = api.post("/v1/answer", json={"question": "Who?", "wait_for": ["no-such-doc"]})
    assert waited.status_code == 404 and "no-such-doc" in _detail(waited)


def test_id_conflict_is_409(api: httpx.Client) -> None:
    assert api.post("/v1/documents", json={"text": "one", "id": "clash"}).status_code == 202
    response = api.post("/v1/documents", json={"text": "two", "id": "clash"})
    assert response.status_code == 409 and "clash" in _detail(response)


@pytest.mark.parametrize(
    "body",
    [
        {"question": ""},
        {"question": "  "},
        {"question": 3},
        {"question": "Who?", "max_new_tokens": 0},
        {"question": "Who?", "max_new_tokens": 100000},
        {"question": "Who?", "timeout_s": -1},
        {"question": "Who?", "wait_for": "not-a-list"},
        {"question": "Who?", "namespace": "no/slashes"},
        {"question": "word " * 700},  # longer than the tiny model's 512 positions
    ],
)
def test_bad_questions_are_422(api: httpx.Client, body: object) -> None:
    assert api.post("/v1/answer", json=body).status_code == 422


def test_answer_reports_version_and_wait_for_times_out(api: httpx.Client) -> None:
    response = api.post(
        "/v1/answer", json={"question": "Where was Alda Venn born?", "max_new_tokens": 4}
    )
    assert response.status_code == 200
    body = response.json()
    assert (
        body["adapter_version"] == 0 and isinstance(body["answer"], str) and body["latency_ms"] > 0
    )
    doc = api.post("/v1/documents", json={"text": "Nobody will apply this: no worker runs."}).json()
    waited = api.post(
        "/v1/answer", json={"question": "Who?", "wait_for": [doc["id"]], "timeout_s": 0.3}
    )
    assert waited.status_code == 408
    assert doc["id"] in _detail(waited) and "timeout_s" in _detail(waited)
    other_ns = api.post(
        "/v1/answer", json={"question": "Who?", "namespace": "elsewhere", "wait_for": [doc["id"]]}
    )
    assert other_ns.status_code == 409 and "another namespace" in _detail(other_ns)


def test_reads(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "reasons": []}
    assert api.get("/readyz").status_code == 200
    status = api.get("/v1/status").json()
    assert status["queue_length"] >= 1 and status["published_version"] == 0
    assert api.get("/v1/adapters").json() == {
        "namespace": "default",
        "serving_version": 0,
        "versions": [],
    }
    metrics = api.get("/metrics")
    assert (
        metrics.status_code == 200
        and 'uptake_documents_received_total{namespace="default"}' in metrics.text
    )
    assert api.get("/v1/status", params={"namespace": "bad ns"}).status_code == 422
    schema = api.get("/openapi.json").json()
    assert "securitySchemes" not in schema["components"]  # auth is off: no key is asked for


def test_redis_down_refuses_writes_and_keeps_reads(tmp_path: Path, tiny_model_dir: Path) -> None:
    with disposable_redis() as (url, server):
        settings = make_settings(tiny_model_dir, tmp_path / "store", url, unique_prefix())
        with api_client(settings) as http:
            queued = http.post("/v1/documents", json={"text": "Queued while Redis was up."})
            assert queued.status_code == 202
            server.kill()
            server.wait()
            down = http.post("/v1/documents", json={"text": "Sent while Redis is down."})
            assert down.status_code == 503 and "Redis is unreachable" in _detail(down)
            assert http.get(f"/v1/documents/{queued.json()['id']}").status_code == 503
            answer = http.post("/v1/answer", json={"question": "Where?", "max_new_tokens": 3})
            assert answer.status_code == 200 and answer.json()["adapter_version"] == 0
            assert http.get("/healthz").status_code == 200
            ready = http.get("/readyz")
            assert ready.status_code == 503 and "Redis" in ready.json()["reasons"][0]
            assert http.get("/v1/adapters").status_code == 200
            assert http.get("/metrics").status_code == 200


def test_openai_compatible_endpoints(api: httpx.Client) -> None:
    models = api.get("/v1/models").json()
    assert models["object"] == "list" and "default" in [m["id"] for m in models["data"]]
    chat = api.post(
        "/v1/chat/completions",
        json={
            "model": "default",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who?"},
            ],
            "max_tokens": 4,
            "temperature": 0.2,
        },
    )
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion" and body["adapter_version"] == 0
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    completion = api.post(
        "/v1/completions", json={"model": "default", "prompt": "Alda Venn", "max_tokens": 3}
    )
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    no_user = api.post(
        "/v1/chat/completions", json={"messages": [{"role": "system", "content": ""}]}
    )
    assert no_user.status_code == 200
    assert api.post("/v1/completions", json={"prompt": " "}).status_code == 422
    assert api.post("/v1/chat/completions", json={"messages": []}).status_code == 422
    too_long = api.post("/v1/completions", json={"prompt": "word " * 700})
    assert too_long.status_code == 422 and "shorter prompt" in too_long.text
