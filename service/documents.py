"""The document store: each document's text and status as a Redis hash.

Submission is one Lua script, so a document is either stored *and* queued or neither, and a
resubmitted document (same id) is never queued twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from service.keys import GROUP, Keys

Status = Literal["queued", "applied", "failed", "dead", "held", "forgotten", "rolled_back"]
# Statuses a document does not leave by itself: the worker acknowledges its entries unapplied.
SETTLED: tuple[Status, ...] = ("dead", "held", "forgotten", "rolled_back")

# KEYS: doc hash, stream, namespaces set, stats hash. ARGV: namespace, group, then field/value pairs.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'status'), redis.call('HGET', KEYS[1], 'namespace'),
          redis.call('HGET', KEYS[1], 'digest')}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('XADD', KEYS[2], '*', 'id', redis.call('HGET', KEYS[1], 'id'))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'received', 1)
return {1, 'queued', ARGV[1], redis.call('HGET', KEYS[1], 'digest')}
"""

# KEYS: doc hash, stream. ARGV: namespace, now. Only an applied document of this namespace (its
# stream entry already acknowledged) is queued again, so running it twice queues nothing twice.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'applied'
   or redis.call('HGET', KEYS[1], 'namespace') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', '0', 'updated', ARGV[2])
redis.call('HDEL', KEYS[1], 'adapter_version', 'error')
redis.call('XADD', KEYS[2], '*', 'id', redis.call('HGET', KEYS[1], 'id'))
return 1
"""


class IdConflict(ValueError):
    """A client-chosen id already names a different document, in `namespace`: the API names that
    namespace only to a key that covers it."""

    def __init__(self, doc_id: str, namespace: str) -> None:
        super().__init__(f"document id {doc_id!r} already names a different document")
        self.namespace = namespace


@dataclass(frozen=True)
class Submission:
    id: str
    status: Status
    namespace: str
    created: bool


@dataclass(frozen=True)
class DocumentRecord:
    id: str
    text: str
    namespace: str
    status: Status
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    self_edits: tuple[str, ...] = ()
    adapter_version: int | None = None
    error: str | None = None
    attempts: int = 0
    created: float = 0.0
    updated: float = 0.0
    # What the worker recorded when it learned the document (None: not learned yet, or not in
    # this mode); a replay reuses `trust`, so it learns the document as the lineage did.
    trust: float | None = None
    sequences: int | None = None
    self_edit_sequences: int | None = None
    note: str | None = None
    # The ids learned in one micro-batch with it, itself included (None: learned alone); a
    # replay learns them together again.
    batch: tuple[str, ...] | None = None
    learned: float | None = None  # when a worker last learned it (Unix seconds)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> DocumentRecord:
        return cls(
            id=h["id"],
            text=h.get("text", ""),
            namespace=h["namespace"],
            status=h["status"],  # type: ignore[arg-type]
            source=h.get("source") or None,
            metadata=json.loads(h.get("metadata") or "{}"),
            self_edits=tuple(json.loads(h.get("self_edits") or "[]")),
            adapter_version=int(h["adapter_version"]) if h.get("adapter_version") else None,
            error=h.get("error") or None,
            attempts=int(h.get("attempts", 0)),
            created=float(h.get("created", 0.0)),
            updated=float(h.get("updated", 0.0)),
            trust=float(h["trust"]) if h.get("trust") else None,
            sequences=int(h["sequences"]) if h.get("sequences") else None,
            self_edit_sequences=(
                int(h["self_edit_sequences"]) if h.get("self_edit_sequences") else None
            ),
            note=h.get("note") or None,
            batch=tuple(json.loads(h["batch"])) if h.get("batch") else None,
            learned=float(h["learned"]) if h.get("learned") else None,
        )


def _content(text: str, self_edits: Sequence[str]) -> bytes:
    """A document's content as bytes: its text alone when it has no self-edits (so those keep the
    ids and digests they always had), else a 0xFF byte and the JSON of text and self-edits. Text
    is valid UTF-8, which never holds 0xFF, so the two forms cannot collide."""
    if not self_edits:
        return text.encode()
    return b"\xff" + json.dumps([text, *self_edits], ensure_ascii=False).encode()


def digest(text: str, self_edits: Sequence[str] = ()) -> str:
    """What an id names: resubmitting the same content is idempotent, other content is a 409."""
    return hashlib.sha256(_content(text, self_edits)).hexdigest()


def document_id(text: str, namespace: str, self_edits: Sequence[str] = ()) -> str:
    """The default id, a hash of namespace and content: `adaptation.data.content_id` for a
    document without self-edits, and another id for the same text with other self-edits."""
    content = namespace.encode() + b"\0" + _content(text, self_edits)
    return hashlib.sha256(content).hexdigest()[:24]


class DocumentStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._submit = client.register_script(_SUBMIT)
        self._requeue = client.register_script(_REQUEUE)

    def submit(
        self,
        text: str,
        namespace: str = "default",
        doc_id: str | None = None,
        source: str | None = None,
        metadata: dict[str, Any] | None = None,
        self_edits: Sequence[str] = (),
    ) -> Submission:
        """Store and queue a document, unless its id is already known (then report its status)."""
        doc_id = doc_id or document_id(text, namespace, self_edits)
        now = f"{time.time():.6f}"
        fields = {
            "id": doc_id,
            "text": text,
            "digest": digest(text, self_edits),
            "namespace": namespace,
            "source": source or "",
            "metadata": json.dumps(metadata or {}),
            "self_edits": json.dumps(list(self_edits)),
            "status": "queued",
            "attempts": "0",
            "created": now,
            "updated": now,
        }
        args: list[str] = [namespace, GROUP]
        for key, value in fields.items():
            args += [key, value]
        keys = [
            self.keys.doc(doc_id),
            self.keys.stream(namespace),
            self.keys.namespaces,
            self.keys.stats(namespace),
        ]
        created, status, stored_ns, stored_digest = self._submit(keys=keys, args=args)
        if not created and (stored_ns != namespace or stored_digest != fields["digest"]):
            raise IdConflict(doc_id, stored_ns)
        return Submission(id=doc_id, status=status, namespace=stored_ns, created=bool(created))

    def get(self, doc_id: str) -> DocumentRecord | None:
        h = self.redis.hgetall(self.keys.doc(doc_id))
        return DocumentRecord.from_hash(h) if h else None

    def statuses(self, doc_ids: Iterable[str]) -> dict[str, DocumentRecord | None]:
        """Status fields (not texts) for many documents in one round trip."""
        ids = list(doc_ids)
        names = ["id", "namespace", "status", "adapter_version", "error", "attempts", "learned"]
        pipe = self.redis.pipeline()
        for doc_id in ids:
            pipe.hmget(self.keys.doc(doc_id), names)
        out: dict[str, DocumentRecord | None] = {}
        for doc_id, values in zip(ids, pipe.execute(), strict=True):
            h = {k: v for k, v in zip(names, values, strict=True) if v is not None}
            out[doc_id] = DocumentRecord.from_hash(h) if "status" in h else None
        return out

    def applied_in(self, namespace: str, versions: Iterable[int]) -> set[str]:
        """Ids of this namespace's documents recorded as applied in one of `versions`. Scans every
        document, so it is only for the rare repair after a snapshot was lost."""
        wanted = set(versions)
        head = self.keys.doc("")
        keys = self.redis.scan_iter(match=_glob_escape(head) + "*", count=1000, _type="hash")
        records = self.statuses(key[len(head) :] for key in keys)
        return {
            doc_id
            for doc_id, r in records.items()
            if r
            and r.namespace == namespace
            and r.status == "applied"
            and r.adapter_version in wanted
        }

    def requeue(self, namespace: str, doc_ids: Iterable[str]) -> list[str]:
        """Queue applied documents again because the snapshot holding them was lost; their attempt
        count restarts, since they had succeeded. Returns the ids actually queued."""
        stream = self.keys.stream(namespace)
        now = f"{time.time():.6f}"
        return [
            doc_id
            for doc_id in doc_ids
            if self._requeue(keys=[self.keys.doc(doc_id), stream], args=[namespace, now])
        ]

    def begin_attempt(self, doc_id: str) -> int:
        """Count an attempt before it starts, so a document that kills the worker is still counted."""
        return int(self.redis.hincrby(self.keys.doc(doc_id), "attempts", 1))

    def mark_applied(self, doc_ids: Iterable[str], version: int) -> None:
        now = f"{time.time():.6f}"
        pipe = self.redis.pipeline()
        for doc_id in doc_ids:
            key = self.keys.doc(doc_id)
            pipe.hset(
                key, mapping={"status": "applied", "adapter_version": version, "updated": now}
            )
            pipe.hdel(key, "error")
        pipe.execute()

    def end_attempt(
        self,
        doc_id: str,
        trust: float | None,
        sequences: int | None,
        self_edit_sequences: int | None,
        note: str | None,
        batch: Sequence[str] | None = None,
    ) -> None:
        """Uncount an attempt that learned the document, and record how it was learned (None:
        not a notion of its mode), with the micro-batch it was learned in (None: alone, which
        clears one recorded by an earlier attempt). Only failed or cut-off attempts count
        toward dead-lettering: a worker killed after learning a document, before its snapshot,
        says nothing about it."""
        values = {
            "trust": trust,
            "sequences": sequences,
            "self_edit_sequences": self_edit_sequences,
            "note": note,
            "batch": json.dumps(list(batch)) if batch else None,
            "learned": f"{time.time():.6f}",
        }
        present = {name: value for name, value in values.items() if value is not None}
        key = self.keys.doc(doc_id)
        pipe = self.redis.pipeline()
        pipe.hincrby(key, "attempts", -1)
        if present:
            pipe.hset(key, mapping=present)
        if not batch:
            pipe.hdel(key, "batch")
        pipe.execute()

    def mark_failed(self, doc_id: str, error: str, dead: bool = False) -> None:
        self.mark([doc_id], "dead" if dead else "failed", error)

    def mark(self, doc_ids: Iterable[str], status: Status, reason: str) -> None:
        """Set a status that needs explaining (failed, dead, held, rolled back, re-queued)."""
        fields = {"status": status, "error": reason, "updated": f"{time.time():.6f}"}
        pipe = self.redis.pipeline()
        for doc_id in doc_ids:
            pipe.hset(self.keys.doc(doc_id), mapping=fields)
        pipe.execute()

    def forget(self, doc_ids: Iterable[str]) -> None:
        """Mark documents forgotten and drop their text and self-edits; the digest stays, so the
        same content sent again is recognised (and reported forgotten) rather than silently
        learned again."""
        now = f"{time.time():.6f}"
        pipe = self.redis.pipeline()
        for doc_id in doc_ids:
            key = self.keys.doc(doc_id)
            pipe.hset(key, mapping={"status": "forgotten", "updated": now})
            pipe.hdel(key, "text", "self_edits", "adapter_version", "error")
        pipe.execute()


def _glob_escape(text: str) -> str:
    """`text` as a literal in a Redis SCAN MATCH pattern (a prefix may hold glob characters)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
