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
            yield schemathesis.openapi.from_url(f"{base}/openapi.json")
        drop_prefix(url, prefix)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate()
