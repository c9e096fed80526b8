"""Property-based API testing: schemathesis with all its checks against the app's own OpenAPI
schema, with keys on: once with a key holding every scope on one namespace, once with no key.
Both runs also check that no response carries a document of a namespace the key does not cover."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from service.settings import Settings
from service.worker import Worker
from tests.servicekit import serve, wait_until

# The default checks, with the API's documented answers to limits counted as what they are: 413
# (a document over the size or batch limit, documented as maxLength and maxItems) rejects input,
# and 408 (wait_for not satisfied within timeout_s) is a valid request that ran out of time.
REJECTED = [
    *("400", "401", "403", "404", "405", "406", "409", "413"),
    *("415", "422", "428", "429", "5xx"),
]
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "408", "409", "429", "5xx"]
CHECKS = {
    "negative_data_rejection": {"expected-statuses": REJECTED},
    "positive_data_acceptance": {"expected-statuses": ACCEPTED},
}
# The namespace the fuzzing key covers; requests that name no namespace use it.
TENANT = "default"
# Another tenant's namespace, holding a learned document: neither its text nor its id may ever
# appear in a response to the fuzzing key or to no key. Fuzzing cannot guess either string.
VAULT = "vault-3c9e71d0a2b4f865"
SECRET_ID = "vault-doc-5e0b8a13c7d24f96"
SECRET_TEXT = "The vault code of Orsilde Quanmarrow is ZEPHYRQUILL-4471-MARKER."


@dataclass(frozen=True)
class Deployment:
    base_url: str
    token: str  # read, write and admin on TENANT


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    with serve(tmp, tiny_model_dir, timeout=120, auth=True, max_doc_chars=2000, max_batch=8) as s:
        _learn_secret(s.http, s.settings, s.keys.create(VAULT, ("read", "write"))[1])
        # No rate limit: a 429 would only cut the fuzzing short.
        yield Deployment(s.url, s.keys.create(TENANT, ("read", "write", "admin"), 0)[1])


def _learn_secret(http: httpx.Client, config: Settings, token: str) -> None:
    """Have the vault's document applied and served, so its id is in a manifest and its
    namespace has an adapter: there is something to leak."""
    headers = {"Authorization": f"Bearer {token}"}
    doc = {"id": SECRET_ID, "text": SECRET_TEXT, "namespace": VAULT}
    assert http.post("/v1/documents", json=doc, headers=headers).status_code == 202
    worker = Worker(config)
    worker.load()

    def applied() -> bool:
        worker.run_once()
        return http.get(f"/v1/documents/{SECRET_ID}", headers=headers).json()["status"] == "applied"

    wait_until(applied, 120, interval=0, what="the secret document to be applied")
    worker.shutdown()
    served = {"question": "Whose code?", "namespace": VAULT, "wait_for": [SECRET_ID]}
    assert http.post("/v1/answer", json=served, headers=headers).status_code == 200


def _schema(deployment: Deployment, **config: object) -> object:
    return schemathesis.openapi.from_url(
        f"{deployment.base_url}/openapi.json",
        config=schemathesis.Config.from_dict({"checks": CHECKS, **config}),
    )


@pytest.fixture(scope="module")
def keyed_schema(deployment: Deployment) -> object:
    """Schemathesis sends the key as the schema's bearer scheme, so it knows which of its
    requests carry it (those it strips the key from are expected to get 401)."""
    return _schema(deployment, auth={"openapi": {"HTTPBearer": {"bearer": deployment.token}}})


@pytest.fixture(scope="module")
def open_schema(deployment: Deployment) -> object:
    return _schema(deployment)


keyed = schemathesis.pytest.from_fixture("keyed_schema")
unkeyed = schemathesis.pytest.from_fixture("open_schema")


def no_other_tenants_data(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """A custom check: the body names nothing of the vault's document."""
    leaked = [s for s in (SECRET_TEXT, SECRET_ID) if s in response.text]
    assert not leaked, f"the response leaks another namespace's document: {leaked}"


@keyed.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_with_a_key_for_one_namespace(case: schemathesis.Case) -> None:
    # Valid requests to a namespace path go to the key's own, so the admin endpoints get past
    # the namespace check; generated names only meet the 403 (tests/test_auth.py covers it).
    if not _negative(case) and "namespace" in (case.path_parameters or {}):
        case.path_parameters["namespace"] = TENANT
    _call(case)


@unkeyed.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_without_a_key(case: schemathesis.Case) -> None:
    _call(case)


def _negative(case: schemathesis.Case) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_negative


def _call(case: schemathesis.Case) -> None:
    """Send the case (trimmed, if it would generate at length) and run every check on it."""
    if case.path in GENERATING and isinstance(case.body, dict) and not _negative(case):
        _keep_generation_small(case.body)
    case.call_and_validate(additional_checks=[no_other_tenants_data], timeout=120)


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
