"""Property-based API testing: schemathesis against the app's own OpenAPI schema, default checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.servicekit import (
    drop_prefix,
    live_api,
    make_settings,
    redis_for_tests,
    unique_prefix,
    wait_until,
)

# The default checks, with the API's documented answers to limits counted as what they are: 413
# (a document over the size or batch limit, documented as maxLength and maxItems) rejects input,
# and 408 (wait_for not satisfied within timeout_s) is a valid request that ran out of time.
REJECTED = [
    *("400", "401", "403", "404", "405", "406", "409", "413"),
    *("415", "422", "428", "429", "5xx"),
]
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "408", "409", "429", "5xx"]
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "negative_data_rejection": {"expected-statuses": REJECTED},
            "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        }
    }
)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[object]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    with redis_for_tests(tmp) as url:
        prefix = unique_prefix()
        config = make_settings(
            tiny_model_dir, tmp / "store", url, prefix, max_doc_chars=2000, max_batch=8
        )
        with live_api(config) as base:
            wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 60, what="readiness")
            yield schemathesis.openapi.from_url(f"{base}/openapi.json", config=CONFIG)
        drop_prefix(url, prefix)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if case.path in GENERATING and isinstance(case.body, dict) and not negative:
        _keep_generation_small(case.body)
    case.call_and_validate(timeout=120)


GENERATING = ("/v1/answer", "/v1/completions", "/v1/chat/completions")


def _keep_generation_small(body: dict) -> None:
    """Trim valid requests that would only test the CPU, or the tiny model's limits (both are
    right by design and covered in test_api): the tiny model reads 512 positions, so a longer
    prompt is a 422; no worker runs, so a wait_for naming a generated document waits out
    timeout_s (30 s by default) into a 408; and long prompts and answers only cost time."""
    for key in ("question", "prompt"):
        if isinstance(body.get(key), str):
            body[key] = body[key][:100]
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            message["content"] = message["content"][:100]
    for key in ("max_new_tokens", "max_tokens"):
        if _number(body.get(key)):
            body[key] = min(body[key], 8)
    if body.get("wait_for") and _number(body.get("timeout_s", 30)):
        body["timeout_s"] = min(body.get("timeout_s", 30), 1)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
