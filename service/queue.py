"""The work queue: one Redis Stream per namespace, read through the consumer group "workers".

An entry carries only a document id; the text lives in the document store. Entries are
acknowledged (and deleted) only once the snapshot holding their document is durable, so the
stream always holds exactly the outstanding work: its length is the queue depth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from service.keys import GROUP, Keys


@dataclass(frozen=True)
class Entry:
    namespace: str
    entry_id: str
    doc_id: str


@dataclass(frozen=True)
class Depth:
    length: int
    pending: int
    dead: int


class Queue:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def ensure_group(self, namespace: str) -> None:
        try:
            self.redis.xgroup_create(self.keys.stream(namespace), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(
        self, namespaces: Iterable[str], consumer: str, count: int, block_ms: int | None
    ) -> list[Entry]:
        """New entries for `consumer`; `block_ms=None` returns at once, never blocks forever."""
        streams = {self.keys.stream(ns): ">" for ns in namespaces}
        if not streams:
            return []
        block = max(1, block_ms) if block_ms else None
        reply = self.redis.xreadgroup(GROUP, consumer, streams, count=count, block=block)
        by_stream = {self.keys.stream(ns): ns for ns in namespaces}
        out: list[Entry] = []
        for stream, messages in reply or []:
            ns = by_stream[stream]
            out.extend(Entry(ns, entry_id, fields["id"]) for entry_id, fields in messages)
        return out

    def claim_pending(self, namespace: str, consumer: str, min_idle_ms: int = 0) -> list[Entry]:
        """Take over every pending entry idle at least `min_idle_ms` (a dead worker's in-flight work)."""
        stream = self.keys.stream(namespace)
        out: list[Entry] = []
        cursor = "0-0"
        while True:
            reply = self.redis.xautoclaim(stream, GROUP, consumer, min_idle_ms, cursor, count=100)
            cursor, messages = reply[0], reply[1]
            out.extend(Entry(namespace, eid, f["id"]) for eid, f in messages if f)
            if cursor == "0-0":
                return out

    def ack(self, namespace: str, entry_ids: Iterable[str]) -> None:
        ids = list(entry_ids)
        if not ids:
            return
        stream = self.keys.stream(namespace)
        pipe = self.redis.pipeline()
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """Record the document and why it was given up on, then drop it from the work stream."""
        stream = self.keys.stream(entry.namespace)
        pipe = self.redis.pipeline()
        pipe.xadd(
            self.keys.dead(entry.namespace),
            {"id": entry.doc_id, "reason": reason, "at": f"{time.time():.3f}"},
        )
        pipe.xack(stream, GROUP, entry.entry_id)
        pipe.xdel(stream, entry.entry_id)
        pipe.execute()

    def dead_letters(self, namespace: str, count: int = 100) -> list[dict[str, str]]:
        return [fields for _, fields in self.redis.xrange(self.keys.dead(namespace), count=count)]

    def depth(self, namespace: str) -> Depth:
        stream = self.keys.stream(namespace)
        pipe = self.redis.pipeline()
        pipe.exists(stream)
        pipe.xlen(stream)
        pipe.xlen(self.keys.dead(namespace))
        exists, length, dead = pipe.execute()
        pending = self.redis.xpending(stream, GROUP)["pending"] if exists else 0
        return Depth(length=int(length), pending=int(pending), dead=int(dead))
