"""Retries and dead letters: a document that fails is tried again after `retry_seconds`, and one
that has failed `max_deliveries` times (or whose attempts a crash cut short as often) is
dead-lettered with its reason, so one bad document never blocks its namespace."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from service.documents import DocumentRecord, DocumentStore
from service.metrics import WorkerStats
from service.namespace_state import NamespaceState
from service.queue import Entry, Queue
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Retries:
    settings: Settings
    docs: DocumentStore
    queue: Queue
    stats: WorkerStats

    def due(self, st: NamespaceState) -> list[Entry]:
        """Take the namespace's retries whose time has come."""
        now = time.monotonic()
        out = [e for t, e in st.retries if t <= now]
        st.retries = [(t, e) for t, e in st.retries if t > now]
        return out

    def exhausted(self, entry: Entry, record: DocumentRecord) -> bool:
        """Dead-letter the document if its attempts are used up before this one starts (each
        was cut short, by a crash or a stop); True if it was."""
        if record.attempts < self.settings.max_deliveries:
            return False
        last = record.error or "the worker stopped while applying it"
        self.dead(entry, f"gave up after {record.attempts} attempts; last: {last}")
        return True

    def failed(self, st: NamespaceState, entry: Entry, attempt: int, reason: str) -> None:
        """Record a failed attempt: try again later, or dead-letter after the last one."""
        self.stats.count(st.name, "failed")
        log.warning("worker: %s failed (attempt %d): %s", entry.doc_id, attempt, reason)
        if attempt >= self.settings.max_deliveries:
            self.dead(entry, f"failed {attempt} times; last: {reason}")
        else:
            self.docs.mark_failed(entry.doc_id, reason)
            st.retries.append((time.monotonic() + self.settings.retry_seconds, entry))

    def missing(self, entry: Entry) -> None:
        """Dead-letter an entry whose document record is gone from Redis."""
        self.queue.dead_letter(entry, "document record missing from Redis")
        self.stats.count(entry.namespace, "dead")

    def dead(self, entry: Entry, reason: str) -> None:
        log.warning("worker: dead-lettering %s: %s", entry.doc_id, reason)
        self.docs.mark_failed(entry.doc_id, reason, dead=True)
        self.queue.dead_letter(entry, reason)
        self.stats.count(entry.namespace, "dead")
