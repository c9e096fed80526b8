"""The OpenAI-compatible routes, so existing clients work unchanged: `model` names the namespace,
and every answer also says which adapter version gave it. With `stream: true` the reply comes as
server-sent events, one chunk per piece of text, as OpenAI's clients expect."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from adaptation.prompts import Message
from service.deps import GUARDED, Reader, Services, Svc, problems
from service.engine import Reply
from service.routes.answers import generate
from service.schemas import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatIn,
    ChatOut,
    ChatReply,
    CompletionChoice,
    CompletionChunk,
    CompletionIn,
    CompletionOut,
    ModelCard,
    ModelList,
    Streaming,
    Usage,
)
from service.streaming import Streamed

router = APIRouter()


def streamed(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The documented 200 of a route that can stream: JSON, or with `stream: true` events whose
    `data` is a chunk's JSON, then `[DONE]`."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json"},
            "event": {"type": "string"},
        },
    }
    return {
        200: {
            "content": {"text/event-stream": {"schema": event}},
            "description": f"with `stream: true`: `data:` events of a {chunk.__name__} each, "
            "then `data: [DONE]`",
        }
    }


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _events(s: Services, namespace: str, chunks: Iterator[BaseModel]) -> Iterator[str]:
    """Server-sent events of the chunks, closed by `[DONE]`; the whole stream is timed as one
    answer."""
    started = time.perf_counter()
    for chunk in chunks:
        yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    yield "data: [DONE]\n\n"
    s.metrics.answer_seconds.labels(namespace).observe(time.perf_counter() - started)


def _stream(
    s: Services,
    body: Streaming,
    namespace: str,
    reply: Streamed,
    chunk: Callable[..., BaseModel],
    piece: Callable[[str | None, str | None], Any],
) -> StreamingResponse:
    """The reply as events: a first chunk, one per piece, a last one with the finish reason and
    the version, and the usage when asked for."""

    def chunks() -> Iterator[BaseModel]:
        yield chunk(choices=[piece(None, None)])
        for text in reply:
            yield chunk(choices=[piece(text, None)])
        yield chunk(choices=[piece(None, "stop")], adapter_version=reply.version)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk(choices=[], usage=usage(reply.prompt_tokens, reply.completion_tokens))

    return StreamingResponse(_events(s, namespace, chunks()), media_type="text/event-stream")


def _meta(kind: str, model: str) -> dict[str, Any]:
    return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


@router.post(
    "/v1/completions",
    response_model=CompletionOut,
    responses={**problems(*GUARDED, 503), **streamed(CompletionChunk)},
    summary="OpenAI-compatible completion; `model` names the namespace",
)
async def completions(
    s: Svc, body: CompletionIn, access: Reader
) -> CompletionOut | StreamingResponse:
    access.require(body.model)
    meta = _meta("cmpl", body.model)
    if body.stream:
        streamed = await generate(
            s, s.engine.stream_complete, body.prompt, body.model, body.max_tokens, timed=False
        )
        return _stream(
            s,
            body,
            body.model,
            streamed,
            lambda **kw: CompletionChunk(**meta, **kw),
            lambda text, finish: CompletionChoice(text=text or "", finish_reason=finish),
        )
    reply: Reply = await generate(s, s.engine.complete, body.prompt, body.model, body.max_tokens)
    return CompletionOut(
        **meta,
        choices=[CompletionChoice(text=reply.text)],
        usage=usage(reply.prompt_tokens, reply.completion_tokens),
        adapter_version=reply.version,
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatOut,
    responses={**problems(*GUARDED, 503), **streamed(ChatChunk)},
    summary="OpenAI-compatible chat, in the base model's chat template",
)
async def chat(s: Svc, body: ChatIn, access: Reader) -> ChatOut | StreamingResponse:
    access.require(body.model)
    messages: list[Message] = [{"role": m.role, "content": m.content} for m in body.messages]
    meta = _meta("chatcmpl", body.model)
    if body.stream:
        streamed = await generate(
            s, s.engine.stream_chat, messages, body.model, body.max_tokens, timed=False
        )
        return _stream(
            s,
            body,
            body.model,
            streamed,
            lambda **kw: ChatChunk(**meta, **kw),
            lambda text, finish: ChatChunkChoice(
                delta=ChatDelta(role=None if text or finish else "assistant", content=text),
                finish_reason=finish,
            ),
        )
    reply: Reply = await generate(s, s.engine.chat, messages, body.model, body.max_tokens)
    return ChatOut(
        **meta,
        choices=[ChatChoice(message=ChatReply(content=reply.text))],
        usage=usage(reply.prompt_tokens, reply.completion_tokens),
        adapter_version=reply.version,
    )


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=problems(*GUARDED),
    summary="OpenAI-compatible: the namespaces (those the API key covers) and the base they adapt",
)
def models(s: Svc, access: Reader) -> ModelList:
    names = access.visible({"default", *s.engine.versions(), *s.store.namespaces()})
    cards = [
        ModelCard(id=ns, adapter_version=s.engine.version(ns), base_model=s.settings.model)
        for ns in names
    ]
    return ModelList(data=cards)
