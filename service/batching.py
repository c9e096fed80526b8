"""Micro-batching of concurrent questions: one padded forward pass serves many clients.

Decoder-only generation costs about the same for 1 or 32 short prompts on the same hardware, so
questions that arrive together are gathered for at most `max_wait` seconds (or until `max_batch`
are waiting) and answered in one call. Questions for different namespaces share the call too:
each row of the batch runs through its own namespace's adapter.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

# Answers (namespace, question) pairs with one token budget; returns each answer with the adapter
# version it came from.
RunBatch = Callable[[list[tuple[str, str]], int], list[tuple[str, int]]]


@dataclass
class _Question:
    text: str
    namespace: str
    budget: int
    result: Future[tuple[str, int]] = field(default_factory=Future)


class AnswerBatcher:
    def __init__(self, run_batch: RunBatch, max_batch: int = 32, max_wait: float = 0.005) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._inbox: queue.Queue[_Question | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="uptake-batcher", daemon=True)
        self._thread.start()

    def answer(self, question: str, namespace: str, budget: int) -> tuple[str, int]:
        """Blocks the calling thread until its batch is answered."""
        item = _Question(question, namespace, budget)
        self._inbox.put(item)
        return item.result.result()

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._serve(batch)
                    return
                batch.append(item)
            self._serve(batch)

    def _serve(self, batch: list[_Question]) -> None:
        groups: dict[int, list[_Question]] = {}
        for q in batch:
            groups.setdefault(q.budget, []).append(q)
        for budget, group in groups.items():
            try:
                answers = self.run_batch([(q.namespace, q.text) for q in group], budget)
            except Exception as exc:  # each waiting request gets the error, the thread lives on
                for q in group:
                    q.result.set_exception(exc)
                continue
            for q, answer in zip(group, answers, strict=True):
                q.result.set_result(answer)
