"""`uptake forget-check`: does forgetting a document undo what it taught, and only that?

Runs the service as deployed (`uptake serve` and `uptake worker` as child processes, on a fresh
store), answers every question of a stream's first documents on the bare base, ingests the
documents, answers again, forgets the document whose questions gained most, and answers a third
time. The forgotten document's F1 should fall back towards the base while the others' answers
stay as they were; the figures say how far each happened.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from adaptation.answering import SCORED_ANSWER_TOKENS
from adaptation.data import Document, read_documents
from adaptation.lab.live import live_service, wait_until
from adaptation.metrics import score

NAMESPACE = "forget-check"
SETTLE_SECONDS = 3600
PHASES = ("before_ingest", "after_ingest", "after_forget")


@dataclass(frozen=True)
class ForgetConfig:
    docs: int = 20
    lr: float = 2e-3
    steps_per_doc: int = 1


@dataclass(frozen=True)
class Phase:
    """Every question's answer at one point, grouped by document, and the version they came
    from."""

    answers: list[list[str]]
    version: int


def run_forget_check(
    model: str,
    data: Path,
    cfg: ForgetConfig,
    env: Mapping[str, str],
    command: str = "uptake forget-check",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The figures of one run (see `forget_figures`), with the settings that produced them.

    `env` is the service's whole configuration as `UPTAKE_*` variables (`Settings.child_env()`),
    Redis URL included: the run changes only what it must and reads the rest back from it."""
    docs = [d for d in read_documents(data) if d.questions][: cfg.docs]
    if len(docs) < 2:
        raise ValueError(f"{data} has fewer than 2 documents with questions; nothing to compare")
    started = time.perf_counter()
    prefix = f"uptake-forget-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="uptake-forget-") as tmp:
        service = {k: v for k, v in env.items() if k != "UPTAKE_GUARD_PROBES"}
        # The guard is left off: it could hold documents back and blur the figures.
        service.update(
            {
                "UPTAKE_MODEL": model,
                "UPTAKE_STORE_DIR": str(Path(tmp) / "store"),
                "UPTAKE_REDIS_PREFIX": prefix,
                "UPTAKE_AUTH": "false",
                "UPTAKE_LR": str(cfg.lr),
                "UPTAKE_STEPS_PER_DOC": str(cfg.steps_per_doc),
            }
        )
        try:
            with live_service(service, Path(tmp) / "store" / "logs", with_worker=True) as http:
                phases, forgotten = _measure(http, docs, int(env["UPTAKE_MAX_BATCH"]), log)
        finally:
            _drop_keys(env["UPTAKE_REDIS_URL"], prefix)
    figures = forget_figures(docs, phases, forgotten)
    figures.update(
        {
            "command": command,
            "model": model,
            "data": str(data),
            "strategy": env["UPTAKE_STRATEGY"],
            "lr": cfg.lr,
            "steps_per_doc": cfg.steps_per_doc,
            "snapshot_every": int(env["UPTAKE_SNAPSHOT_EVERY"]),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return figures


def _drop_keys(url: str, prefix: str) -> None:
    """Leave the shared Redis as the run found it."""
    client = redis.Redis.from_url(url)
    stale = list(client.scan_iter(f"{prefix}*", count=500))
    if stale:
        client.delete(*stale)
    client.close()


def _measure(
    http: httpx.Client, docs: Sequence[Document], max_batch: int, log: Callable[[str], None]
) -> tuple[dict[str, Phase], int]:
    """The three rounds of answers, and the index of the document that was forgotten."""
    questions = sum(len(d.questions) for d in docs)
    log(f"answering {questions} questions of {len(docs)} documents on the bare base")
    phases = {"before_ingest": _answer_all(http, docs)}
    log(f"ingesting {len(docs)} documents into namespace {NAMESPACE!r}")
    for start in range(0, len(docs), max_batch):
        batch = docs[start : start + max_batch]
        body = {"documents": [{"id": d.id, "text": d.text, "namespace": NAMESPACE} for d in batch]}
        http.post("/v1/documents", json=body).raise_for_status()
    wait_until(lambda: _applied(http, docs), SETTLE_SECONDS, "the documents to be applied")
    wait_until(lambda: _serving_published(http), SETTLE_SECONDS, "the new version to be served")
    phases["after_ingest"] = _answer_all(http, docs)
    before, after = phases["before_ingest"].answers, phases["after_ingest"].answers
    gains = [_f1(d, a) - _f1(d, b) for d, b, a in zip(docs, before, after, strict=True)]
    pick = max(range(len(docs)), key=gains.__getitem__)
    log(f"forgetting {docs[pick].id}, whose F1 gained most ({gains[pick]:+.3f})")
    http.delete(f"/v1/documents/{docs[pick].id}").raise_for_status()
    wait_until(lambda: _forgotten(http, docs[pick].id), SETTLE_SECONDS, "the forget to finish")
    phases["after_forget"] = _answer_all(http, docs)
    return phases, pick


def _answer_all(http: httpx.Client, docs: Sequence[Document]) -> Phase:
    """One request at a time, so each answer is generated alone and a change in it means a
    change in the model, not in the batch it shared."""
    answers: list[list[str]] = []
    versions: set[int] = set()
    for doc in docs:
        answers.append([])
        for qa in doc.questions:
            body = {
                "question": qa.question,
                "namespace": NAMESPACE,
                "max_new_tokens": SCORED_ANSWER_TOKENS,
            }
            response = http.post("/v1/answer", json=body)
            response.raise_for_status()
            answers[-1].append(response.json()["answer"])
            versions.add(response.json()["adapter_version"])
    if len(versions) != 1:
        raise RuntimeError(f"answers came from several versions ({sorted(versions)})")
    return Phase(answers, versions.pop())


def _applied(http: httpx.Client, docs: Sequence[Document]) -> bool:
    statuses = {d.id: http.get(f"/v1/documents/{d.id}").json()["status"] for d in docs}
    stuck = {i: s for i, s in statuses.items() if s in ("dead", "held")}
    if stuck:
        raise RuntimeError(f"documents will not be applied: {stuck}")
    return all(s == "applied" for s in statuses.values())


def _serving_published(http: httpx.Client) -> bool:
    out = http.get("/v1/status", params={"namespace": NAMESPACE}).json()
    return out["serving_version"] == out["published_version"] > 0


def _forgotten(http: httpx.Client, doc_id: str) -> bool:
    status = http.get(f"/v1/documents/{doc_id}").json()["status"]
    pending = http.get(f"/v1/namespaces/{NAMESPACE}").json()["pending_operations"]
    return status == "forgotten" and not pending and _serving_published(http)


def _f1(doc: Document, answers: Sequence[str]) -> float:
    return score(answers, [qa.answers for qa in doc.questions])["f1"]


def forget_figures(
    docs: Sequence[Document], phases: dict[str, Phase], forgotten: int
) -> dict[str, Any]:
    """Per-document F1 in each phase; the forgotten document's against the others' mean; and
    how many of the others' answers the forget left exactly as they were."""
    f1 = {p: [_f1(d, a) for d, a in zip(docs, phases[p].answers, strict=True)] for p in PHASES}
    others = [i for i in range(len(docs)) if i != forgotten]
    pairs = [
        (x, y)
        for i in others
        for x, y in zip(
            phases["after_ingest"].answers[i], phases["after_forget"].answers[i], strict=True
        )
    ]
    return {
        "documents": len(docs),
        "questions": sum(len(d.questions) for d in docs),
        "versions": {p: phases[p].version for p in PHASES},
        "forgotten": {
            "id": docs[forgotten].id,
            "questions": len(docs[forgotten].questions),
            "f1": {p: f1[p][forgotten] for p in PHASES},
        },
        "others": {
            "documents": len(others),
            "questions": len(pairs),
            "mean_f1": {p: sum(f1[p][i] for i in others) / len(others) for p in PHASES},
            "answers_unchanged_by_forget": sum(x == y for x, y in pairs) / len(pairs),
        },
        "per_document": [
            {
                "id": d.id,
                "f1": {p: f1[p][i] for p in PHASES},
                "answers": {p: phases[p].answers[i] for p in PHASES},
                "gold": [list(qa.answers) for qa in d.questions],
            }
            for i, d in enumerate(docs)
        ],
    }


def forget_table(figures: dict[str, Any]) -> str:
    """The figures as a small Markdown table, with what they say in words."""
    gone, others = figures["forgotten"], figures["others"]
    lines = [
        f"{figures['strategy']}, lr {figures['lr']:g} x "
        f"{figures['steps_per_doc']} steps, {figures['documents']} "
        f"documents, {figures['questions']} questions; versions "
        + " / ".join(str(figures["versions"][p]) for p in PHASES),
        "",
        "| F1 | before ingest | after ingest | after forget |",
        "| --- | --- | --- | --- |",
        f"| forgotten {gone['id']} ({gone['questions']} questions) | "
        + " | ".join(f"{gone['f1'][p]:.3f}" for p in PHASES)
        + " |",
        f"| other {others['documents']} documents, mean ({others['questions']} questions) | "
        + " | ".join(f"{others['mean_f1'][p]:.3f}" for p in PHASES)
        + " |",
        "",
        f"other documents' answers unchanged by the forget: "
        f"{others['answers_unchanged_by_forget']:.1%}",
    ]
    gained = gone["f1"]["after_ingest"] - gone["f1"]["before_ingest"]
    if gained <= 0:
        lines.append(
            "no document's F1 rose above the base: the model learned nothing here to forget"
        )
    return "\n".join(lines)


def write_figures(figures: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
