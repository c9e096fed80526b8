"""What every route shares, injected the FastAPI way: the services built once per process (kept
on `app.state` by the app's lifespan), the API-key check per scope, and the path parameters
several resources take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials

from service.adapters import AdapterStore
from service.auth import Access, Authority, Scope, bearer
from service.documents import DocumentStore
from service.engine import ServingEngine, open_engine
from service.keys import Keys
from service.metrics import ApiMetrics
from service.namespaces import NamespaceStore
from service.queue import Queue
from service.redis_conn import connect
from service.schemas import ID_PATTERN, Problem
from service.settings import NAMESPACE_PATTERN, Settings

# A guarded route may answer these before it looks at the request: no key, a key without the
# scope or namespace, or a key over its rate limit.
GUARDED = (401, 403, 429)


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    keys: Keys
    docs: DocumentStore
    queue: Queue
    store: AdapterStore
    engine: ServingEngine
    metrics: ApiMetrics
    authority: Authority
    namespaces: NamespaceStore

    @classmethod
    def start(cls, settings: Settings) -> Services:
        client = connect(settings)
        keys = Keys(settings.redis_prefix)
        store = AdapterStore(settings.adapters_dir())
        metrics = ApiMetrics(client, keys)
        engine = open_engine(
            settings,
            client,
            keys,
            store,
            on_switch=lambda ns, v: metrics.serving_version.labels(ns).set(v),
            on_batch=metrics.answer_batch_size.observe,
        )
        engine.start()
        return cls(
            settings,
            client,
            keys,
            DocumentStore(client, keys),
            Queue(client, keys),
            store,
            engine,
            metrics,
            Authority(settings, client, keys),
            NamespaceStore(client, keys),
        )

    def close(self) -> None:
        self.engine.stop()
        self.redis.close()


async def services(request: Request) -> Services:
    """The process's services; async, so reading them costs no trip to the thread pool."""
    return request.app.state.services


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that answers `codes` with a `Problem`."""
    return {code: {"model": Problem} for code in codes}


def _requires(*scopes: Scope) -> Any:
    """A dependency admitting requests whose API key holds one of `scopes` (all, with auth off)."""

    def admit(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Access:
        authority: Authority = request.app.state.services.authority
        return authority.admit(request, credentials, scopes)

    return Depends(admit)


Svc = Annotated[Services, Depends(services)]
Reader = Annotated[Access, _requires("read")]
Writer = Annotated[Access, _requires("write")]
Admin = Annotated[Access, _requires("admin")]
# Whoever ingests follows what became of the documents, readers pass them in wait_for, and an
# admin checks what a forget did.
Tracker = Annotated[Access, _requires("read", "write", "admin")]
NamespacePath = Annotated[str, Path(pattern=NAMESPACE_PATTERN)]
DocIdPath = Annotated[str, Path(pattern=ID_PATTERN)]
