"""The OpenAI-compatible routes, so existing clients work unchanged: `model` names the namespace,
and every answer also says which adapter version gave it."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter

from adaptation.prompts import Message
from service.deps import GUARDED, Reader, Svc, problems
from service.routes.answers import generate
from service.schemas import (
    ChatChoice,
    ChatIn,
    ChatOut,
    ChatReply,
    CompletionChoice,
    CompletionIn,
    CompletionOut,
    ModelCard,
    ModelList,
)

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=CompletionOut,
    responses=problems(*GUARDED, 503),
    summary="OpenAI-compatible completion; `model` names the namespace",
)
async def completions(s: Svc, body: CompletionIn, access: Reader) -> CompletionOut:
    access.require(body.model)
    text, version = await generate(s, s.engine.complete, body.prompt, body.model, body.max_tokens)
    return CompletionOut(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        choices=[CompletionChoice(text=text)],
        adapter_version=version,
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatOut,
    responses=problems(*GUARDED, 503),
    summary="OpenAI-compatible chat, in the base model's chat template",
)
async def chat(s: Svc, body: ChatIn, access: Reader) -> ChatOut:
    access.require(body.model)
    messages: list[Message] = [{"role": m.role, "content": m.content} for m in body.messages]
    text, version = await generate(s, s.engine.chat, messages, body.model, body.max_tokens)
    return ChatOut(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        choices=[ChatChoice(message=ChatReply(content=text))],
        adapter_version=version,
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
