"""Namespaces and their sources: a namespace's own settings, how far each source is trusted, and
the admin operations (rollback; forget is under documents) queued for its worker."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from starlette.convertors import PathConvertor, register_url_convertor

from service.deps import GUARDED, Admin, NamespacePath, Services, Svc, problems
from service.errors import unprocessable
from service.namespaces import Refused, available_strategies, check_rollback
from service.schemas import (
    EffectiveSettings,
    NamespaceConfig,
    NamespaceOut,
    Operation,
    RollbackIn,
    SourcesOut,
    SourceTrustIn,
)
from service.settings import Settings


class _AnyText(PathConvertor):
    """Starlette's `path` convertor stops at a line break, and a document's `source` may hold
    one: this one matches every character, so every source a document can carry is addressable."""

    regex = r"[\s\S]+"


register_url_convertor("anytext", _AnyText())
SourcePath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=2048,
        pattern=r"\S",
        description="a document `source`, as sent (URL-encoded; it may hold slashes and line breaks)",
    ),
]

router = APIRouter()


@router.put(
    "/v1/namespaces/{namespace}",
    response_model=NamespaceOut,
    responses=problems(*GUARDED, 503),
    summary="Create or configure a namespace: mode, strategy, learning rate, steps per "
    "document, the update guard's probe questions and epsilon, self-edits (mode seal), the "
    "default source trust and source tags",
)
def configure_namespace(
    s: Svc, namespace: NamespacePath, body: NamespaceConfig, access: Admin
) -> NamespaceOut:
    access.require(namespace)
    _check_runnable(s.settings, body)
    s.namespaces.configure(namespace, body)
    return _namespace(s, namespace)


@router.get(
    "/v1/namespaces/{namespace}",
    response_model=NamespaceOut,
    responses=problems(*GUARDED, 503),
    summary="A namespace's settings (its own and in effect) and its pending operations",
)
def get_namespace(s: Svc, namespace: NamespacePath, access: Admin) -> NamespaceOut:
    access.require(namespace)
    return _namespace(s, namespace)


@router.get(
    "/v1/namespaces/{namespace}/sources",
    response_model=SourcesOut,
    responses=problems(*GUARDED, 503),
    summary="The namespace's source trust: the weight of each source that has its own, and "
    "the default for every other (mode mac ignores trust)",
)
def get_sources(s: Svc, namespace: NamespacePath, access: Admin) -> SourcesOut:
    access.require(namespace)
    return _sources(s, namespace)


@router.put(
    "/v1/namespaces/{namespace}/sources/{source:anytext}",
    response_model=SourcesOut,
    responses=problems(*GUARDED, 503),
    summary="Set how strongly a source's documents are learned, from the next document the "
    "worker learns (documents already learned keep the trust they were learned with)",
)
def set_source_trust(
    s: Svc, namespace: NamespacePath, source: SourcePath, body: SourceTrustIn, access: Admin
) -> SourcesOut:
    access.require(namespace)
    s.namespaces.set_trust(namespace, source, body.trust)
    return _sources(s, namespace)


@router.delete(
    "/v1/namespaces/{namespace}/sources/{source:anytext}",
    response_model=SourcesOut,
    responses=problems(*GUARDED, 503),
    summary="Give a source the namespace's default trust again",
)
def reset_source_trust(
    s: Svc, namespace: NamespacePath, source: SourcePath, access: Admin
) -> SourcesOut:
    access.require(namespace)
    s.namespaces.reset_trust(namespace, source)
    return _sources(s, namespace)


@router.post(
    "/v1/namespaces/{namespace}/rollback",
    status_code=202,
    response_model=Operation,
    responses=problems(*GUARDED, 404, 409, 503),
    summary="Make an older version current again; the worker publishes it as a new version "
    "and continues the lineage from it",
)
def rollback(s: Svc, namespace: NamespacePath, body: RollbackIn, access: Admin) -> Operation:
    access.require(namespace)
    try:
        check_rollback(s.store, s.docs, namespace, body.version)
    except Refused as exc:
        raise HTTPException(exc.status, exc.detail) from exc
    return s.namespaces.request(namespace, "rollback", version=body.version)


def _check_runnable(settings: Settings, body: NamespaceConfig) -> None:
    """422 for a mode or strategy this deployment's worker cannot run."""
    if body.mode not in (None, settings.mode):
        raise unprocessable(
            ("body", "mode"),
            f"mode {body.mode!r} is not what this deployment's worker runs "
            f"(UPTAKE_MODE={settings.mode}); use {settings.mode!r} or leave it out",
            "value_error",
        )
    usable = available_strategies(settings)
    if body.strategy is not None and body.strategy not in usable:
        raise unprocessable(
            ("body", "strategy"),
            f"strategy {body.strategy!r} needs a saved weighter this deployment lacks "
            f"(UPTAKE_WEIGHTER serves UPTAKE_STRATEGY={settings.strategy}); choose one of "
            f"{', '.join(usable)}",
            "value_error",
        )


def _sources(s: Services, namespace: str) -> SourcesOut:
    default = s.namespaces.config(namespace).apply(s.settings).default_trust
    return SourcesOut.model_validate(s.namespaces.trust(namespace, default).to_dict())


def _namespace(s: Services, namespace: str) -> NamespaceOut:
    config = s.namespaces.config(namespace)
    effective = config.apply(s.settings)
    probes = "namespace" if config.probes else "service" if s.settings.guard_probes else "none"
    return NamespaceOut(
        namespace=namespace,
        config=config,
        effective=EffectiveSettings(
            mode=effective.mode,
            strategy=effective.strategy,
            lr=effective.lr,
            steps_per_doc=effective.steps_per_doc,
            guard_epsilon=effective.guard_epsilon,
            probes=probes,
            self_edit_k=effective.self_edit_k,
            self_edit_prompt=effective.self_edit_prompt,
            self_edit_tokens=effective.self_edit_tokens,
            default_trust=effective.default_trust,
            source_tags=effective.source_tags,
            rehearse=effective.rehearse,
            rehearsal_window=effective.rehearsal_window,
        ),
        published_version=int(s.redis.get(s.keys.version(namespace)) or 0),
        pending_operations=s.namespaces.pending(namespace),
    )
