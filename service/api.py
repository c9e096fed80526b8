"""The HTTP API (FastAPI). OpenAPI at /docs.

Writes go through Redis, so when Redis is down they return 503; answering needs only the loaded
model, so it keeps working (the version it reports is the last one loaded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import redis
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adaptation.prompts import Message
from service.adapters import AdapterStore
from service.auth import Access, Authority, Scope, bearer
from service.documents import SETTLED, DocumentRecord, DocumentStore, IdConflict
from service.engine import PromptTooLong, ServingEngine, open_engine
from service.keys import Keys
from service.metrics import ApiMetrics, worker_problem
from service.namespaces import NamespaceStore, Refused, available_strategies, check_rollback
from service.queue import Queue
from service.redis_conn import connect
from service.schemas import (
    ID_PATTERN,
    AdaptersOut,
    AnswerIn,
    AnswerOut,
    ChatChoice,
    ChatIn,
    ChatOut,
    ChatReply,
    CompletionChoice,
    CompletionIn,
    CompletionOut,
    DocumentAccepted,
    DocumentBatchIn,
    DocumentIn,
    DocumentOut,
    DocumentsAccepted,
    DocumentsIn,
    EffectiveSettings,
    Health,
    ManifestOut,
    ModelCard,
    ModelList,
    Namespace,
    NamespaceConfig,
    NamespaceOut,
    Operation,
    Problem,
    RollbackIn,
    SourcesOut,
    SourceTrustIn,
    StatusOut,
    WorkerProblem,
    json_depth,
)
from service.settings import NAMESPACE_PATTERN, Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 0.1
# How much of a rejected input a 422 repeats back.
ECHO_CHARS = 200
ECHO_DEPTH = 4
_REDIS_DOWN = "Redis is unreachable, so nothing can be queued or looked up right now; retry shortly"


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


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
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


Reader = Annotated[Access, _requires("read")]
Writer = Annotated[Access, _requires("write")]
Admin = Annotated[Access, _requires("admin")]
# Whoever ingests follows what became of the documents, readers pass them in wait_for, and an
# admin checks what a forget did.
Tracker = Annotated[Access, _requires("read", "write", "admin")]
NamespacePath = Annotated[str, Path(pattern=NAMESPACE_PATTERN)]
DocIdPath = Annotated[str, Path(pattern=ID_PATTERN)]


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
GUARDED = (401, 403, 429)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await run_in_threadpool(Services.start, settings)
        yield
        await run_in_threadpool(app.state.services.close)

    app = FastAPI(
        title="uptake",
        version="0.1.0",
        summary="Keeps a language model's knowledge current: documents in, answers out.",
        lifespan=lifespan,
    )
    max_body = settings.max_doc_chars * settings.max_batch * 4 + (1 << 20)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return JSONResponse(
                status_code=413,
                content={
                    "detail": f"request body of {int(length):,} bytes is over the limit of "
                    f"{max_body:,}; send fewer or smaller documents"
                },
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{**e, "input": _echo(e["input"])} if "input" in e else e for e in exc.errors()]
        # Escape non-ASCII: the rejected input may hold lone surrogates that UTF-8 cannot carry.
        content = json.dumps({"detail": jsonable_encoder(errors)}, ensure_ascii=True)
        return Response(content, status_code=422, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode at all
            msg = "the request body is not valid JSON in UTF-8; send a JSON object"
            return await invalid_input(request, _unprocessable(("body",), msg, "json_invalid"))
        if exc.status_code == 405:  # Starlette names only the first route's methods
            allowed = ", ".join(_allowed_methods(request))
            return JSONResponse(
                status_code=405,
                content={"detail": f"{request.method} is not allowed here; use {allowed}"},
                headers={"Allow": allowed},
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("%s %s: Redis error: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=503, content={"detail": f"{_REDIS_DOWN} ({exc})"})

    def services(request: Request) -> Services:
        return request.app.state.services

    @app.post(
        "/v1/documents",
        status_code=202,
        response_model=DocumentAccepted | DocumentsAccepted,
        responses=_problems(*GUARDED, 409, 413, 503),
        summary="Queue one document, or a batch as {documents: [...]}",
    )
    def post_documents(
        request: Request, body: Annotated[DocumentsIn, Body()], access: Writer
    ) -> DocumentAccepted | DocumentsAccepted:
        s = services(request)
        batch = body.documents if isinstance(body, DocumentBatchIn) else [body]
        access.require(*(doc.namespace for doc in batch))
        if len(batch) > settings.max_batch:
            raise HTTPException(
                413,
                f"a batch of {len(batch)} documents is over the limit of {settings.max_batch} "
                "(UPTAKE_MAX_BATCH); send it in parts",
            )
        for i, doc in enumerate(batch):
            where = f"document {i}" if isinstance(body, DocumentBatchIn) else "the document"
            parts = {where: doc.text}
            parts.update((f"{where}'s self_edits[{j}]", e) for j, e in enumerate(doc.self_edits))
            for part, content in parts.items():
                if len(content) > settings.max_doc_chars:
                    raise HTTPException(
                        413,
                        f"{part} has {len(content):,} characters, over the limit of "
                        f"{settings.max_doc_chars:,} (UPTAKE_MAX_DOC_CHARS); split it into parts",
                    )
        accepted = [_submit(s.docs, doc, access) for doc in batch]
        return (
            DocumentsAccepted(documents=accepted)
            if isinstance(body, DocumentBatchIn)
            else accepted[0]
        )

    @app.get(
        "/v1/documents/{doc_id}",
        response_model=DocumentOut,
        responses=_problems(*GUARDED, 404, 503),
        summary="A document's status: queued, applied (with its adapter version), failed, dead, "
        "held (by the update guard), forgotten or rolled_back",
    )
    def get_document(request: Request, doc_id: DocIdPath, access: Tracker) -> DocumentOut:
        record = _document(services(request), doc_id, access)
        return DocumentOut(
            id=record.id,
            namespace=record.namespace,
            status=record.status,
            adapter_version=record.adapter_version,
            error=record.error,
            attempts=record.attempts,
            source=record.source,
            metadata=record.metadata,
            self_edits=len(record.self_edits),
            trust=record.trust,
            sequences=record.sequences,
            self_edit_sequences=record.self_edit_sequences,
            note=record.note,
            created=record.created,
            updated=record.updated,
        )

    @app.delete(
        "/v1/documents/{doc_id}",
        status_code=202,
        response_model=Operation,
        responses=_problems(*GUARDED, 404, 503),
        summary="Forget a document: its namespace's worker replays the lineage without it and "
        "publishes the result as a new version",
    )
    def forget_document(request: Request, doc_id: DocIdPath, access: Admin) -> Operation:
        s = services(request)
        record = _document(s, doc_id, access)
        return s.namespaces.request(record.namespace, "forget", document=doc_id)

    @app.put(
        "/v1/namespaces/{namespace}",
        response_model=NamespaceOut,
        responses=_problems(*GUARDED, 503),
        summary="Create or configure a namespace: mode, strategy, learning rate, steps per "
        "document, the update guard's probe questions and epsilon, self-edits (mode seal), the "
        "default source trust and source tags",
    )
    def configure_namespace(
        request: Request, namespace: NamespacePath, body: NamespaceConfig, access: Admin
    ) -> NamespaceOut:
        access.require(namespace)
        if body.mode not in (None, settings.mode):
            raise _unprocessable(
                ("body", "mode"),
                f"mode {body.mode!r} is not what this deployment's worker runs "
                f"(UPTAKE_MODE={settings.mode}); use {settings.mode!r} or leave it out",
                "value_error",
            )
        usable = available_strategies(settings)
        if body.strategy is not None and body.strategy not in usable:
            raise _unprocessable(
                ("body", "strategy"),
                f"strategy {body.strategy!r} needs a saved weighter this deployment lacks "
                f"(UPTAKE_WEIGHTER serves UPTAKE_STRATEGY={settings.strategy}); choose one of "
                f"{', '.join(usable)}",
                "value_error",
            )
        s = services(request)
        s.namespaces.configure(namespace, body)
        return _namespace(s, namespace)

    @app.get(
        "/v1/namespaces/{namespace}",
        response_model=NamespaceOut,
        responses=_problems(*GUARDED, 503),
        summary="A namespace's settings (its own and in effect) and its pending operations",
    )
    def get_namespace(request: Request, namespace: NamespacePath, access: Admin) -> NamespaceOut:
        access.require(namespace)
        return _namespace(services(request), namespace)

    @app.get(
        "/v1/namespaces/{namespace}/sources",
        response_model=SourcesOut,
        responses=_problems(*GUARDED, 503),
        summary="The namespace's source trust: the weight of each source that has its own, and "
        "the default for every other (mode mac ignores trust)",
    )
    def get_sources(request: Request, namespace: NamespacePath, access: Admin) -> SourcesOut:
        access.require(namespace)
        return _sources(services(request), namespace)

    @app.put(
        "/v1/namespaces/{namespace}/sources/{source:anytext}",
        response_model=SourcesOut,
        responses=_problems(*GUARDED, 503),
        summary="Set how strongly a source's documents are learned, from the next document the "
        "worker learns (documents already learned keep the trust they were learned with)",
    )
    def set_source_trust(
        request: Request,
        namespace: NamespacePath,
        source: SourcePath,
        body: SourceTrustIn,
        access: Admin,
    ) -> SourcesOut:
        access.require(namespace)
        s = services(request)
        s.namespaces.set_trust(namespace, source, body.trust)
        return _sources(s, namespace)

    @app.delete(
        "/v1/namespaces/{namespace}/sources/{source:anytext}",
        response_model=SourcesOut,
        responses=_problems(*GUARDED, 503),
        summary="Give a source the namespace's default trust again",
    )
    def reset_source_trust(
        request: Request, namespace: NamespacePath, source: SourcePath, access: Admin
    ) -> SourcesOut:
        access.require(namespace)
        s = services(request)
        s.namespaces.reset_trust(namespace, source)
        return _sources(s, namespace)

    @app.post(
        "/v1/namespaces/{namespace}/rollback",
        status_code=202,
        response_model=Operation,
        responses=_problems(*GUARDED, 404, 409, 503),
        summary="Make an older version current again; the worker publishes it as a new version "
        "and continues the lineage from it",
    )
    def rollback(
        request: Request, namespace: NamespacePath, body: RollbackIn, access: Admin
    ) -> Operation:
        access.require(namespace)
        s = services(request)
        try:
            check_rollback(s.store, s.docs, namespace, body.version)
        except Refused as exc:
            raise HTTPException(exc.status, exc.detail) from exc
        return s.namespaces.request(namespace, "rollback", version=body.version)

    @app.post(
        "/v1/answer",
        response_model=AnswerOut,
        responses=_problems(*GUARDED, 404, 408, 409, 503),
        summary="Answer a question from the newest knowledge; wait_for gives read-your-writes",
    )
    async def answer(request: Request, body: AnswerIn, access: Reader) -> AnswerOut:
        s = services(request)
        access.require(body.namespace)
        _require_model(s.engine)
        if body.wait_for:
            await _wait_applied(s, body, access)
        started = time.perf_counter()
        text, version = await _generate(
            s, s.engine.answer, body.question, body.namespace, body.max_new_tokens
        )
        seconds = time.perf_counter() - started
        return AnswerOut(
            answer=text,
            adapter_version=version,
            namespace=body.namespace,
            latency_ms=round(seconds * 1000, 3),
        )

    @app.get(
        "/v1/adapters",
        response_model=AdaptersOut,
        responses=_problems(*GUARDED),
        summary="Adapter versions and manifests",
    )
    def adapters(
        request: Request, access: Reader, namespace: Annotated[Namespace, Query()] = "default"
    ) -> AdaptersOut:
        access.require(namespace)
        s = services(request)
        versions = [ManifestOut(**m.to_json()) for m in s.store.manifests(namespace)]
        return AdaptersOut(
            namespace=namespace, serving_version=s.engine.version(namespace), versions=versions
        )

    @app.get(
        "/v1/status",
        response_model=StatusOut,
        responses=_problems(*GUARDED, 503),
        summary="Queue depth, dead letters, versions and documents applied",
    )
    def status(
        request: Request, access: Reader, namespace: Annotated[Namespace, Query()] = "default"
    ) -> StatusOut:
        access.require(namespace)
        s = services(request)
        depth = s.queue.depth(namespace)
        published = int(s.redis.get(s.keys.version(namespace)) or 0)
        latest = s.store.latest(namespace)
        applied = s.store.manifest(namespace, latest).lineage_size if latest else 0
        problem = worker_problem(s.redis, s.keys, namespace)
        return StatusOut(
            namespace=namespace,
            queue_length=depth.length,
            pending=depth.pending,
            dead_letters=depth.dead,
            published_version=published,
            serving_version=s.engine.version(namespace),
            documents_applied=applied,
            state_bytes=s.store.nbytes(namespace, latest),
            quarantined=s.store.quarantined(namespace),
            worker_problem=WorkerProblem(reason=problem[0], since=problem[1]) if problem else None,
            model=settings.model,
            mode=settings.mode,
            strategy=settings.strategy,
        )

    @app.post(
        "/v1/completions",
        response_model=CompletionOut,
        responses=_problems(*GUARDED, 503),
        summary="OpenAI-compatible completion; `model` names the namespace",
    )
    async def completions(request: Request, body: CompletionIn, access: Reader) -> CompletionOut:
        access.require(body.model)
        s = services(request)
        text, version = await _generate(
            s, s.engine.complete, body.prompt, body.model, body.max_tokens
        )
        return CompletionOut(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=[CompletionChoice(text=text)],
            adapter_version=version,
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatOut,
        responses=_problems(*GUARDED, 503),
        summary="OpenAI-compatible chat, in the base model's chat template",
    )
    async def chat(request: Request, body: ChatIn, access: Reader) -> ChatOut:
        access.require(body.model)
        s = services(request)
        messages: list[Message] = [{"role": m.role, "content": m.content} for m in body.messages]
        text, version = await _generate(s, s.engine.chat, messages, body.model, body.max_tokens)
        return ChatOut(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=[ChatChoice(message=ChatReply(content=text))],
            adapter_version=version,
        )

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=_problems(*GUARDED),
        summary="OpenAI-compatible: the namespaces (those the API key covers) and the base they adapt",
    )
    def models(request: Request, access: Reader) -> ModelList:
        s = services(request)
        names = access.visible({"default", *s.engine.versions(), *s.store.namespaces()})
        cards = [
            ModelCard(id=ns, adapter_version=s.engine.version(ns), base_model=settings.model)
            for ns in names
        ]
        return ModelList(data=cards)

    @app.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health}},
        summary="Readiness: the model is loaded and Redis answers",
    )
    def readyz(request: Request) -> Response:
        s = services(request)
        reasons = []
        if not s.engine.ready:
            reasons.append(s.engine.error or "the model is still loading")
        try:
            s.redis.ping()
        except redis.RedisError as exc:
            reasons.append(f"Redis is unreachable ({exc})")
        health = Health(status="not ready" if reasons else "ready", reasons=reasons)
        return JSONResponse(status_code=503 if reasons else 200, content=health.model_dump())

    @app.get(
        "/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {}}}}
    )
    def metrics(request: Request) -> Response:
        return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """The generated schema, plus the limits this deployment enforces with 413; without
        auth, no bearer scheme, since no key is asked for."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            models = schema["components"]["schemas"]
            document = models["DocumentIn"]["properties"]
            document["text"]["maxLength"] = settings.max_doc_chars
            document["self_edits"]["items"]["maxLength"] = settings.max_doc_chars
            models["DocumentBatchIn"]["properties"]["documents"]["maxItems"] = settings.max_batch
            choices = {"mode": [settings.mode], "strategy": list(available_strategies(settings))}
            for field_name, allowed in choices.items():
                for option in models["NamespaceConfig"]["properties"][field_name]["anyOf"]:
                    if "enum" in option:
                        option["enum"] = allowed
            for operations in schema["paths"].values():
                for operation in operations.values():
                    # uvicorn answers a malformed request (a bad Content-Length, say) itself.
                    operation["responses"].setdefault(
                        "400", {"description": "malformed HTTP request, refused by the server"}
                    )
                    if not settings.auth:
                        operation.pop("security", None)
            if not settings.auth:
                schema["components"].pop("securitySchemes", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _echo(value: object) -> object:
    """A rejected input as a 422 repeats it: strings (and undecodable bytes) cut short, and
    anything large, deeply nested or beyond strict JSON (NaN, Infinity) only named, so the error
    is always small, valid JSON."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…"
    try:
        shallow = json_depth(value) <= ECHO_DEPTH
        encoded = json.dumps(value, allow_nan=False) if shallow else ""
    except (TypeError, ValueError):
        encoded = ""
    if encoded and len(encoded) <= ECHO_CHARS:
        return value
    return f"({type(value).__name__} not repeated: too large, too deep or not strict JSON)"


def _unprocessable(loc: tuple[str, ...], msg: str, kind: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own validation errors, so clients parse one format."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


def _submit(docs: DocumentStore, doc: DocumentIn, access: Access) -> DocumentAccepted:
    try:
        sub = docs.submit(doc.text, doc.namespace, doc.id, doc.source, doc.metadata, doc.self_edits)
    except IdConflict as exc:
        where = f" (namespace {exc.namespace!r})" if access.covers(exc.namespace) else ""
        raise HTTPException(
            409, f"{exc}{where}; choose another id or omit it to use a content hash"
        ) from exc
    return DocumentAccepted(id=sub.id, status=sub.status, namespace=sub.namespace)


async def _generate(
    s: Services, run: Callable[[T, str, int], tuple[str, int]], text: T, ns: str, budget: int
) -> tuple[str, int]:
    """Generate off the event loop, timing it; a prompt longer than the model reads is a 422."""
    _require_model(s.engine)
    started = time.perf_counter()
    try:
        out = await run_in_threadpool(run, text, ns, budget)
    except PromptTooLong as exc:
        raise _unprocessable(("body",), str(exc), "too_long") from exc
    s.metrics.answer_seconds.labels(ns).observe(time.perf_counter() - started)
    return out


def _document(s: Services, doc_id: str, access: Access) -> DocumentRecord:
    """The document, or 404. Another tenant's is reported as missing: a 403 would confirm that
    it exists."""
    record = s.docs.get(doc_id)
    if record is None or not access.covers(record.namespace):
        raise HTTPException(
            404, f"no document with id {doc_id!r}; ids come from POST /v1/documents"
        )
    return record


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
        ),
        published_version=int(s.redis.get(s.keys.version(namespace)) or 0),
        pending_operations=s.namespaces.pending(namespace),
    )


def _require_model(engine: ServingEngine) -> None:
    if not engine.ready:
        raise HTTPException(
            503, engine.error or "the model is still loading; retry shortly (see /readyz)"
        )


async def _wait_applied(s: Services, body: AnswerIn, access: Access) -> None:
    """Return once every document in wait_for is in the version this replica serves. Documents
    the key cannot see count as unknown, so no tenant learns of another's."""
    deadline = time.monotonic() + body.timeout_s
    while True:
        records = await run_in_threadpool(s.docs.statuses, body.wait_for)
        unknown = [i for i, r in records.items() if r is None or not access.covers(r.namespace)]
        if unknown:
            raise HTTPException(404, f"wait_for names unknown document ids: {', '.join(unknown)}")
        elsewhere = [i for i, r in records.items() if r.namespace != body.namespace]
        if elsewhere:
            msg = f"documents {', '.join(elsewhere)} belong to another namespace than {body.namespace!r}"
            raise HTTPException(409, f"wait_for: {msg}")
        settled = [
            f"{i} ({r.status}: {r.error})" for i, r in records.items() if r.status in SETTLED
        ]
        if settled:
            raise HTTPException(
                409,
                "these documents were dead-lettered, held back, forgotten or rolled back, and "
                f"will not be applied: {'; '.join(settled)}",
            )
        needed = max((r.adapter_version or 0) for r in records.values())
        waiting = {i: r for i, r in records.items() if r.status != "applied"}
        serving = s.engine.version(body.namespace)
        if not waiting and serving >= needed:
            return
        if time.monotonic() >= deadline:
            parts = [
                f"{i} ({r.status}{': ' + r.error if r.error else ''})" for i, r in waiting.items()
            ]
            if not parts:
                parts = [f"version {needed} is published but this replica still serves {serving}"]
            raise HTTPException(
                408,
                f"not applied within timeout_s={body.timeout_s:g}: {', '.join(parts)}. "
                "Retry with a longer timeout_s, or check GET /v1/documents/{id}",
            )
        await asyncio.sleep(WAIT_POLL_SECONDS)
