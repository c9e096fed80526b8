"""Operations: what a deployment's operator and its orchestrator ask: liveness, readiness,
Prometheus metrics, and a namespace's queue, versions and adapters."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adaptation.mac.bank import BankIndex
from adaptation.mac.system import BANK
from service.deps import GUARDED, Reader, Svc, problems
from service.metrics import worker_problem
from service.schemas import (
    AdaptersOut,
    Health,
    ManifestOut,
    Namespace,
    StatusOut,
    WorkerProblem,
)

router = APIRouter()


@router.get(
    "/v1/adapters",
    response_model=AdaptersOut,
    responses=problems(*GUARDED),
    summary="Adapter versions and manifests",
)
def adapters(
    s: Svc, access: Reader, namespace: Annotated[Namespace, Query()] = "default"
) -> AdaptersOut:
    access.require(namespace)
    versions = [ManifestOut(**m.to_json()) for m in s.store.manifests(namespace)]
    return AdaptersOut(
        namespace=namespace, serving_version=s.engine.version(namespace), versions=versions
    )


@router.get(
    "/v1/status",
    response_model=StatusOut,
    responses=problems(*GUARDED, 503),
    summary="Queue depth, dead letters, versions and documents applied",
)
def status(
    s: Svc, access: Reader, namespace: Annotated[Namespace, Query()] = "default"
) -> StatusOut:
    access.require(namespace)
    depth = s.queue.depth(namespace)
    published = int(s.redis.get(s.keys.version(namespace)) or 0)
    latest = s.store.latest(namespace)
    applied = s.store.manifest(namespace, latest).lineage_size if latest else 0
    problem = worker_problem(s.redis, s.keys, namespace)
    bank = (
        BankIndex.read(s.store.path(namespace, latest) / BANK)
        if s.settings.mode == "mac" and latest
        else None
    )
    return StatusOut(
        namespace=namespace,
        queue_length=depth.length,
        pending=depth.pending,
        dead_letters=depth.dead,
        published_version=published,
        serving_version=s.engine.version(namespace),
        documents_applied=applied,
        state_bytes=s.store.nbytes(namespace, latest),
        bank_entries=None if bank is None else bank.entries,
        bytes_per_document=None if bank is None else bank.entry_nbytes,
        quarantined=s.store.quarantined(namespace),
        worker_problem=WorkerProblem(reason=problem[0], since=problem[1]) if problem else None,
        model=s.settings.model,
        mode=s.settings.mode,
        strategy=s.settings.strategy,
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Readiness: the model is loaded and Redis answers",
)
def readyz(s: Svc) -> Response:
    reasons = []
    if not s.engine.ready:
        reasons.append(s.engine.error or "the model is still loading")
    try:
        s.redis.ping()
    except redis.RedisError as exc:
        reasons.append(f"Redis is unreachable ({exc})")
    health = Health(status="not ready" if reasons else "ready", reasons=reasons)
    return JSONResponse(status_code=503 if reasons else 200, content=health.model_dump())


@router.get(
    "/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {}}}}
)
def metrics(s: Svc) -> Response:
    return Response(s.metrics.render(), media_type=CONTENT_TYPE_LATEST)
