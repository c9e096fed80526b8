"""Answers: a question answered from the newest knowledge, optionally after given documents are
served (read-your-writes). Generation runs off the event loop; the OpenAI-compatible routes
generate the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool

from service.auth import Access
from service.deps import GUARDED, Reader, Services, Svc, problems
from service.documents import SETTLED
from service.engine import PromptTooLong, ServingEngine
from service.errors import unprocessable
from service.schemas import AnswerIn, AnswerOut

T = TypeVar("T")
R = TypeVar("R")
WAIT_POLL_SECONDS = 0.1

router = APIRouter()


@router.post(
    "/v1/answer",
    response_model=AnswerOut,
    responses=problems(*GUARDED, 404, 408, 409, 503),
    summary="Answer a question from the newest knowledge; wait_for gives read-your-writes",
)
async def answer(s: Svc, body: AnswerIn, access: Reader) -> AnswerOut:
    access.require(body.namespace)
    require_model(s.engine)
    if body.wait_for:
        await _wait_applied(s, body, access)
    started = time.perf_counter()
    text, version = await generate(
        s, s.engine.answer, body.question, body.namespace, body.max_new_tokens
    )
    seconds = time.perf_counter() - started
    return AnswerOut(
        answer=text,
        adapter_version=version,
        namespace=body.namespace,
        latency_ms=round(seconds * 1000, 3),
    )


async def generate(
    s: Services, run: Callable[[T, str, int], R], text: T, ns: str, budget: int, timed: bool = True
) -> R:
    """Generate off the event loop, timing it (a stream times itself: here it only starts); a
    prompt longer than the model reads is a 422."""
    require_model(s.engine)
    started = time.perf_counter()
    try:
        out = await run_in_threadpool(run, text, ns, budget)
    except PromptTooLong as exc:
        raise unprocessable(("body",), str(exc), "too_long") from exc
    if timed:
        s.metrics.answer_seconds.labels(ns).observe(time.perf_counter() - started)
    return out


def require_model(engine: ServingEngine) -> None:
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
