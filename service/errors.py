"""How the API says no: every refusal is JSON with an actionable `detail`, a 422 never repeats
more than a little of what it rejected, an oversized body is refused before it is read, and a
Redis outage is a 503 rather than a 500."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.schemas import json_depth
from service.settings import Settings

log = logging.getLogger(__name__)

# How much of a rejected input a 422 repeats back.
ECHO_CHARS = 200
ECHO_DEPTH = 4
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
_REDIS_DOWN = "Redis is unreachable, so nothing can be queued or looked up right now; retry shortly"


def install(app: FastAPI) -> None:
    """Hook the body limit and the error handlers onto `app`."""
    app.middleware("http")(limit_body)
    app.add_exception_handler(RequestValidationError, invalid_input)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(redis.RedisError, redis_down)


def max_body(settings: Settings) -> int:
    """The largest body worth reading: a full batch of the largest documents, with room to
    spare for JSON escapes and metadata."""
    return settings.max_doc_chars * settings.max_batch * 4 + (1 << 20)


async def limit_body(request: Request, call_next: Any) -> Response:
    length = request.headers.get("content-length", "")
    limit = max_body(request.app.state.settings)
    if length.isdigit() and int(length) > limit:
        return JSONResponse(
            status_code=413,
            content={
                "detail": f"request body of {int(length):,} bytes is over the limit of "
                f"{limit:,}; send fewer or smaller documents"
            },
        )
    return await call_next(request)


async def invalid_input(request: Request, exc: RequestValidationError) -> Response:
    errors = [{**e, "input": _echo(e["input"])} if "input" in e else e for e in exc.errors()]
    # Escape non-ASCII: the rejected input may hold lone surrogates that UTF-8 cannot carry.
    content = json.dumps({"detail": jsonable_encoder(errors)}, ensure_ascii=True)
    return Response(content, status_code=422, media_type="application/json")


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode at all
        msg = "the request body is not valid JSON in UTF-8; send a JSON object"
        return await invalid_input(request, unprocessable(("body",), msg, "json_invalid"))
    if exc.status_code == 405:  # Starlette names only the first route's methods
        allowed = ", ".join(_allowed_methods(request))
        return JSONResponse(
            status_code=405,
            content={"detail": f"{request.method} is not allowed here; use {allowed}"},
            headers={"Allow": allowed},
        )
    return await http_exception_handler(request, exc)


async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    log.warning("%s %s: Redis error: %s", request.method, request.url.path, exc)
    return JSONResponse(status_code=503, content={"detail": f"{_REDIS_DOWN} ({exc})"})


def unprocessable(loc: tuple[str, ...], msg: str, kind: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own validation errors, so clients parse one format."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path. Each method is tried on the path, since a
    router included whole shows no methods of its own."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


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
