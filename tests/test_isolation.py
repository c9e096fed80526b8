"""Tenant isolation in what is learned: namespace B answers exactly as before while only namespace
A receives documents. A live API with keys on, a worker thread and a tiny model; answers are
greedy, so any leak of A's adapter into B's answers shows as changed text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servicekit import serve, wait_until, worker_thread

QUESTIONS = (
    "Where was Alda Venn born?",
    "Who does Alda Venn work for?",
    "Where does Oda Lind live?",
    "When was Ivo Brand born?",
)
A_TEXTS = [f"Oda Lind{i} moved to Hale {i} and works for Quillon Works {i}." for i in range(8)]
B_TEXTS = ["Alda Venn was born in Marrow Bay.", "Alda Venn works for Vantor Labs."]


@dataclass
class Tenant:
    http: httpx.Client
    namespace: str
    headers: dict[str, str]

    def submit(self, texts: Sequence[str]) -> list[str]:
        body = {"documents": [{"text": t, "namespace": self.namespace} for t in texts]}
        response = self.http.post("/v1/documents", json=body, headers=self.headers)
        assert response.status_code == 202, response.text
        return [d["id"] for d in response.json()["documents"]]

    def answers(self, wait_for: Sequence[str] = ()) -> tuple[list[str], set[int]]:
        """The answers to QUESTIONS, one request at a time (so no batch mixes namespaces), and
        the versions they came from."""
        texts, versions = [], set()
        for question in QUESTIONS:
            body = {
                "question": question,
                "namespace": self.namespace,
                "max_new_tokens": 8,
                "wait_for": list(wait_for),
                "timeout_s": 120,
            }
            response = self.http.post("/v1/answer", json=body, headers=self.headers)
            assert response.status_code == 200, response.text
            texts.append(response.json()["answer"])
            versions.add(response.json()["adapter_version"])
        return texts, versions

    def versions(self) -> tuple[int, int]:
        """(published, served by this replica)."""
        response = self.http.get(
            "/v1/status", params={"namespace": self.namespace}, headers=self.headers
        )
        assert response.status_code == 200, response.text
        out = response.json()
        return out["published_version"], out["serving_version"]


@pytest.fixture
def tenants(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Tenant, Tenant]]:
    scopes = ("read", "write", "admin")
    with serve(tmp_path, tiny_model_dir, timeout=180, auth=True) as s, worker_thread(s.settings):

        def tenant(ns: str) -> Tenant:
            return Tenant(s.http, ns, {"Authorization": f"Bearer {s.keys.create(ns, scopes)[1]}"})

        yield tenant("iso-a"), tenant("iso-b")


def test_answers_in_b_never_change_while_only_a_learns(tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    # B has an adapter of its own, so its answers come from a version, not from the bare base.
    b_before, b_served = b.answers(wait_for=b.submit(B_TEXTS))
    b_versions = b.versions()
    assert b_served == {b_versions[1]} and b_versions[1] >= 1
    a_before, a_served = a.answers()
    assert a_served == {0}

    # A learns fast enough for its own answers to move, proving the adapters matter here.
    configured = a.http.put(f"/v1/namespaces/{a.namespace}", json={"lr": 0.05}, headers=a.headers)
    assert configured.status_code == 200, configured.text
    a_ids = a.submit(A_TEXTS)

    def a_applied() -> bool:
        assert b.answers() == (b_before, b_served)  # also while A trains and swaps adapters
        statuses = [a.http.get(f"/v1/documents/{i}", headers=a.headers) for i in a_ids]
        return all(s.json()["status"] == "applied" for s in statuses)

    wait_until(a_applied, 180, interval=0, what="A's documents to be applied")
    a_after, a_now = a.answers(wait_for=a_ids)
    assert min(a_now) >= 1 and a.versions()[0] >= 1
    assert a_after != a_before

    assert b.answers() == (b_before, b_served)
    assert b.versions() == b_versions
