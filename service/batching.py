"""Micro-batching of concurrent questions: one padded forward pass serves many clients.

Decoder-only generation costs far less per question for 32 short prompts than for 1, so
questions that arrive together are answered in one call. A batch gathers questions while they
keep coming at most `max_wait` seconds apart, until `max_batch` are waiting or `MAX_GATHER_WAITS`
gaps have passed since the first. Clients answered together ask again together, but the API
parses their requests one after another, so a fixed window from the first question would cut a
round of clients in two. Questions for different namespaces share the call too: each row of the
batch runs through its own namespace's adapter.
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
# The longest a batch gathers, in gaps of max_wait.
MAX_GATHER_WAITS = 5


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
            now = time.monotonic()
            cutoff = now + MAX_GATHER_WAITS * self.max_wait
            while len(batch) < self.max_batch and now < cutoff:
                try:
                    item = self._inbox.get(timeout=min(self.max_wait, cutoff - now))
                except queue.Empty:
                    break
                now = time.monotonic()
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
