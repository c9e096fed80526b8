"""The HTTP API (FastAPI). OpenAPI at /docs.

Writes go through Redis, so when Redis is down they return 503; answering needs only the loaded
model, so it keeps working (the version it reports is the last one loaded).

`create_app` only assembles: the services start in the lifespan (`service.deps`), the routes
live in one router per resource (`service.routes`), and refusals are shaped in `service.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from service import errors
from service.deps import Services
from service.namespaces import available_strategies
from service.routes import answers, documents, namespaces, openai, operations
from service.settings import Settings

ROUTERS = (documents, namespaces, answers, operations, openai)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model and connect to Redis once per process; let both go at shutdown."""
    app.state.services = await run_in_threadpool(Services.start, app.state.settings)
    yield
    await run_in_threadpool(app.state.services.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="uptake",
        version="0.1.0",
        summary="Keeps a language model's knowledge current: documents in, answers out.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    errors.install(app)
    for module in ROUTERS:
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app, app.state.settings)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The generated schema, plus the limits this deployment enforces with 413; without auth, no
    bearer scheme, since no key is asked for."""
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
        for operations_ in schema["paths"].values():
            for operation in operations_.values():
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
