"""Fuzzing the document validator: random unicode, control characters, NUL bytes, huge inputs,
nested JSON and wrong types, against the schemas and through the whole app (in process, ASGI).
Bad input must get a 4xx whose strict-JSON `detail` says what to fix; never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.api import create_app
from service.schemas import MAX_METADATA_BYTES, MAX_METADATA_DEPTH, DocumentIn
from tests.servicekit import isolated_settings

MAX_CHARS = 300
MAX_BATCH = 4
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))

# Every code point, lone surrogates included (JSON can spell them as \ud800 escapes).
ANY_CHAR = st.characters(exclude_categories=())
CONTROL = st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2029\ufeff")
TEXTS = st.one_of(
    st.text(ANY_CHAR, max_size=40),
    st.text(CONTROL, max_size=20),
    st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\xa0\u3000\x00a"), max_size=20),
    st.integers(MAX_CHARS - 2, MAX_CHARS * 40).map(lambda n: "y" * n),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(ANY_CHAR, max_size=12),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
FIELDS = {
    "id": st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True) | JSON,
    "source": st.text(ANY_CHAR, max_size=20) | JSON,
    "namespace": st.sampled_from(["default", "fuzz", "bad ns", ""]) | JSON,
    "metadata": st.dictionaries(st.text(ANY_CHAR, max_size=8), JSON, max_size=4) | JSON,
    "colour": JSON,
}
DOCUMENTS = st.fixed_dictionaries({"text": TEXTS | JSON}, optional=FIELDS)
BODIES = st.one_of(
    DOCUMENTS,
    st.fixed_dictionaries({"documents": st.lists(DOCUMENTS, max_size=MAX_BATCH + 2)}),
    JSON,
)


def nested(depth: int) -> Any:
    """A value whose objects and arrays nest `depth` levels deep (0: a scalar)."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def strict_json(raw: bytes) -> Any:
    """Parse as a strict client would: UTF-8, and no NaN or Infinity."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def acceptable(value: object) -> bool:
    """What the validator must accept as a document's text."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(value.strip())


@given(TEXTS | JSON)
@FUZZ
def test_text_is_accepted_exactly_when_it_is_usable(text: object) -> None:
    try:
        doc = DocumentIn.model_validate({"text": text})
    except ValidationError as exc:
        assert not acceptable(text), exc
        assert all(e["msg"] for e in exc.errors())
    else:
        assert acceptable(text) and doc.text == text


@given(st.integers(0, 3000))
@example(MAX_METADATA_DEPTH - 1)
@example(MAX_METADATA_DEPTH)
@example(2000)
@FUZZ
def test_metadata_nesting_is_bounded_without_recursion_errors(depth: int) -> None:
    metadata = {"deep": nested(depth)}
    try:
        DocumentIn.model_validate({"text": "t", "metadata": metadata})
    except ValidationError as exc:
        assert depth + 1 > MAX_METADATA_DEPTH and "levels deep" in str(exc)
    else:
        assert depth + 1 <= MAX_METADATA_DEPTH


@given(st.dictionaries(st.text(ANY_CHAR, max_size=8), JSON, max_size=6))
@example({"big": "m" * MAX_METADATA_BYTES})
@example({"n": float("nan")})
@example({"s": "\ud800"})
@FUZZ
def test_metadata_is_strict_json_within_its_size(metadata: dict[str, Any]) -> None:
    try:
        doc = DocumentIn.model_validate({"text": "t", "metadata": metadata})
    except ValidationError as exc:
        assert "metadata" in str(exc)
    else:
        encoded = json.dumps(doc.metadata, ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert len(encoded) <= MAX_METADATA_BYTES


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with (
        isolated_settings(
            tmp, tiny_model_dir, max_doc_chars=MAX_CHARS, max_batch=MAX_BATCH
        ) as config,
        TestClient(create_app(config), raise_server_exceptions=False) as client,
    ):
        yield client


def post(http: TestClient, raw: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    """POST raw bytes; assert the answer is a 202 or a 4xx with an actionable message."""
    response = http.post("/v1/documents", content=raw, headers={"content-type": content_type})
    assert response.status_code < 500, (response.status_code, response.text[:500])
    body = strict_json(response.content)
    if response.status_code != 202:
        assert response.status_code in (409, 413, 422), response.status_code
        detail = body["detail"]
        messages = [detail] if isinstance(detail, str) else [e["msg"] for e in detail]
        assert messages and all(isinstance(m, str) and m for m in messages)
    return response.status_code, body


def encode(body: object, ascii_only: bool) -> bytes:
    """JSON as a sloppy client might send it: NaN allowed, lone surrogates raw when not escaped."""
    return json.dumps(body, ensure_ascii=ascii_only, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


@given(BODIES, st.booleans())
@FUZZ
def test_any_json_body_gets_an_answer_a_person_can_act_on(
    http: TestClient, body: object, ascii_only: bool
) -> None:
    status, reply = post(http, encode(body, ascii_only))
    if status != 202:
        return
    for accepted in reply.get("documents", [reply]):
        got = http.get(f"/v1/documents/{accepted['id']}")
        assert got.status_code == 200, got.text[:500]
        strict_json(got.content)


@given(TEXTS)
@FUZZ
def test_text_through_http_is_202_413_or_422_as_documented(http: TestClient, text: str) -> None:
    raw = encode({"text": text, "namespace": "fuzz"}, ascii_only=True)
    response = http.post("/v1/documents", content=raw, headers={"content-type": "application/json"})
    if not acceptable(text):
        expected = 422
    elif len(text) > MAX_CHARS:
        expected = 413
    else:
        expected = 202
    assert response.status_code == expected, response.text[:500]


@given(st.binary(max_size=200), st.sampled_from(["application/json", "text/plain", ""]))
@example(b'{"text": "a\\u0000b"}', "application/json")
@example(b'{"text": "ok", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json")
@example(b'{"text": "ok", "metadata": {"d": ' + b"[" * 900 + b"]" * 900 + b"}}", "application/json")
@example(b'{"text": NaN}', "application/json")
@example(b"\xff\xfe\x00t", "text/plain")
@FUZZ
def test_raw_bytes_never_break_the_api(http: TestClient, raw: bytes, content_type: str) -> None:
    post(http, raw, content_type)
