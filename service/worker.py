"""The worker: folds queued documents into each namespace's knowledge, snapshot by snapshot.

What it guarantees (docs/architecture.md, "Service"):
- a document is acknowledged only once the snapshot that holds it is durable and published, so a
  crash loses nothing;
- on start it resumes from the newest snapshot and takes over the namespace's pending entries
  (`XAUTOCLAIM`); a document already in the lineage is skipped, so each is applied exactly once
  per lineage;
- one worker at a time trains a namespace, by holding its lease in Redis;
- a document that keeps failing is retried, then dead-lettered with its reason.

How a document is learned is a backend's business (`KnowledgeBackend`); the `lora` mode ships
here. Each namespace trains its own LoRA adapter on one shared base model.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis
import torch
from peft import PeftModel

from adaptation.modeling import attach_lora, load_base, lora_config, save_adapter
from adaptation.paths import demo_weighter_dir
from adaptation.updater import OnlineUpdater
from adaptation.weighting.base import Weighter, encode_weighted
from service.adapters import AdapterStore, CorruptSnapshot, Manifest, publish_version
from service.documents import DocumentStore
from service.keys import Keys
from service.metrics import WorkerStats
from service.queue import Entry, Queue
from service.redis_conn import connect
from service.settings import Settings

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"

# Renew (or re-take) a lease only while we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class IngestResult:
    applied: bool
    tokens: int = 0
    reason: str | None = None


class KnowledgeBackend(Protocol):
    """What a mode does with one namespace's documents. The worker owns queueing, snapshots and
    exactly-once; a backend only learns, and writes its state into a snapshot directory."""

    def ingest(self, text: str) -> IngestResult: ...

    def write_state(self, directory: Path) -> None: ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    def open(self, namespace: str, snapshot: Path | None) -> KnowledgeBackend:
        """The namespace's backend, restored from `snapshot` (None: start fresh)."""
        ...


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut long documents at whitespace so no part is silently truncated by the token limit."""
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\n", start, end))
            if cut > start:
                end = cut
        chunks.append(text[start:end])
        start = end
    return [c for c in chunks if c.strip()]


class LoraModels:
    """One base model shared by every namespace's trainable LoRA adapter."""

    def __init__(self, settings: Settings, weighter: Weighter) -> None:
        self.settings = settings
        self.weighter = weighter
        self.base, self.tokenizer = load_base(settings.model, settings.device)
        self.model: PeftModel | None = None

    def open(self, namespace: str, snapshot: Path | None) -> LoraBackend:
        name = f"ns_{namespace}"
        lora = self.settings.lora()
        if self.model is None and snapshot is None:
            self.model = attach_lora(self.base, lora, adapter_name=name)
        elif self.model is None:
            self.model = PeftModel.from_pretrained(
                self.base, str(snapshot), adapter_name=name, is_trainable=True
            )
        elif snapshot is None:
            self.model.add_adapter(name, lora_config(self.model, lora))
        else:
            self.model.load_adapter(str(snapshot), adapter_name=name, is_trainable=True)
        return LoraBackend(self, name, snapshot)


class LoraBackend:
    """Weighted gradient steps on one namespace's adapter; its optimizer state rides in snapshots."""

    def __init__(self, models: LoraModels, adapter_name: str, snapshot: Path | None) -> None:
        assert models.model is not None
        self.models = models
        self.model = models.model
        self.name = adapter_name
        self.model.set_adapter(adapter_name)  # only this adapter's weights are trainable now
        self.updater = OnlineUpdater(self.model, models.settings.update())
        if snapshot is not None:
            state = torch.load(
                snapshot / OPTIMIZER_FILE, map_location=self.updater.device, weights_only=True
            )
            self.updater.load_state_dict(state)

    def ingest(self, text: str) -> IngestResult:
        settings = self.models.settings
        self.model.set_adapter(self.name)
        applied, tokens, reasons = False, 0, []
        for chunk in split_text(text, settings.chunk_chars):
            weighted = encode_weighted(
                chunk, self.models.tokenizer, self.models.weighter, settings.max_doc_tokens
            )
            if weighted.num_tokens < 2:
                continue
            reports = self.updater.apply([weighted])
            if any(r.applied for r in reports):
                applied = True
                tokens += weighted.num_tokens
            reasons += [r.reason for r in reports if not r.applied and r.reason]
        if not applied and not reasons:
            return IngestResult(applied=True)  # nothing long enough to learn from: a no-op
        return IngestResult(applied, tokens, "; ".join(reasons) or None)

    def write_state(self, directory: Path) -> None:
        save_adapter(self.model, directory, adapter_name=self.name)
        torch.save(self.updater.state_dict(), directory / OPTIMIZER_FILE)

    def close(self) -> None:
        self.model.delete_adapter(self.name)


def build_weighter(settings: Settings) -> Weighter:
    from adaptation.weighting import make_weighter

    path = settings.weighter
    if path is None and settings.strategy == "camels":
        path = demo_weighter_dir()
    return make_weighter(settings.strategy, path=path)


def open_backends(settings: Settings, weighter: Weighter) -> BackendFactory:
    if settings.mode == "lora":
        return LoraModels(settings, weighter)
    raise ValueError(
        f"mode {settings.mode!r} is not available in this worker yet; use UPTAKE_MODE=lora"
    )


@dataclass
class NamespaceState:
    name: str
    backend: KnowledgeBackend
    version: int
    lineage: dict[str, int]  # doc id -> the version that added it
    # Applied but not yet in a snapshot: doc id -> stream entry id.
    unsaved: dict[str, str] = field(default_factory=dict)
    unsaved_since: float | None = None
    unpublished: list[tuple[Manifest, list[str]]] = field(default_factory=list)
    backlog: deque[Entry] = field(default_factory=deque)
    retries: list[tuple[float, Entry]] = field(default_factory=list)
    renewed: float = 0.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis | None = None,
        weighter: Weighter | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client if client is not None else connect(settings)
        self.keys = Keys(settings.redis_prefix)
        self.queue = Queue(self.redis, self.keys)
        self.docs = DocumentStore(self.redis, self.keys)
        self.store = AdapterStore(settings.adapters_dir())
        self.stats = WorkerStats(self.redis, self.keys)
        self.consumer = settings.worker_id
        self.namespaces: dict[str, NamespaceState] = {}
        self._weighter = weighter
        self._backends: BackendFactory | None = None
        self._stop = threading.Event()
        self._discovered = 0.0
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    def load(self) -> None:
        """Load the weighter and the base model (the slow part of starting)."""
        if self._backends is None:
            weighter = self._weighter or build_weighter(self.settings)
            self._backends = open_backends(self.settings, weighter)

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        """Work until SIGTERM/SIGINT, then snapshot what is applied and hand the leases back."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self.load()
        log.info(
            "worker %s ready (model %s, mode %s, strategy %s)",
            self.consumer,
            self.settings.model,
            self.settings.mode,
            self.settings.strategy,
        )
        resync = False
        while not self._stop.is_set():
            try:
                if resync:  # entries in hand when the error struck are still pending on us
                    for st in list(self.namespaces.values()):
                        self._reclaim(st)
                    resync = False
                self.run_once()
            except (redis.RedisError, OSError) as exc:
                log.warning("worker: %s; retrying in 1 s", exc)
                resync = True
                self._stop.wait(1.0)
        self.shutdown()

    def run_once(self) -> int:
        """One turn: claim namespaces, apply what is due, read new entries, snapshot what is due."""
        self.load()
        self._discover()
        self._renew_leases()
        for st in list(self.namespaces.values()):
            self._publish(st)
        if not self.namespaces:
            self._stop.wait(0.5)
            return 0
        done = 0
        for entry in self._due():
            if self._stop.is_set():
                return done
            self._renew_leases()
            self._process(entry)
            done += 1
        entries = self.queue.read(
            list(self.namespaces), self.consumer, self.settings.max_batch, self._block_ms()
        )
        for entry in entries:
            if self._stop.is_set():
                break  # left pending; the next start takes them over
            self._renew_leases()
            self._process(entry)
            done += 1
        for st in list(self.namespaces.values()):
            if st.unsaved_since is not None and (
                time.monotonic() - st.unsaved_since >= self.settings.snapshot_seconds
            ):
                self._snapshot(st)
        return done

    def shutdown(self) -> None:
        for st in list(self.namespaces.values()):
            try:
                self._snapshot(st)
                self._publish(st)
                self._release(keys=[self.keys.lease(st.name)], args=[self.consumer])
            except (redis.RedisError, OSError) as exc:
                log.warning("worker: could not finish %s cleanly (%s)", st.name, exc)
        log.info("worker %s stopped", self.consumer)

    # Namespaces and leases.

    def _discover(self) -> None:
        now = time.monotonic()
        if self.namespaces and now - self._discovered < 1.0:
            return
        self._discovered = now
        for ns in sorted(self.redis.smembers(self.keys.namespaces)):
            if ns not in self.namespaces and self._take_lease(ns):
                self._open(ns)

    def _take_lease(self, namespace: str) -> bool:
        key = self.keys.lease(namespace)
        if self.redis.set(key, self.consumer, nx=True, px=self.lease_ms):
            return True
        return bool(self._renew(keys=[key], args=[self.consumer, self.lease_ms]))

    def _renew_leases(self) -> None:
        now = time.monotonic()
        for st in list(self.namespaces.values()):
            if now - st.renewed >= self.settings.lease_seconds / 3:
                self._hold(st)

    def _hold(self, st: NamespaceState) -> bool:
        """Renew the lease. If it lapsed, take it back only if no other worker has it and none has
        written a snapshot meanwhile; otherwise drop the namespace (its entries stay pending)."""
        key = self.keys.lease(st.name)
        if self._renew(keys=[key], args=[self.consumer, self.lease_ms]):
            st.renewed = time.monotonic()
            return True
        retaken = self.redis.set(key, self.consumer, nx=True, px=self.lease_ms)
        if retaken and self.store.latest(st.name) == st.version:
            st.renewed = time.monotonic()
            self._reclaim(st)
            log.warning("worker %s retook the lapsed lease on %s", self.consumer, st.name)
            return True
        log.warning("worker %s lost the lease on %s; dropping it", self.consumer, st.name)
        st.backend.close()
        del self.namespaces[st.name]
        return False

    def _reclaim(self, st: NamespaceState) -> None:
        """Take back pending entries this worker no longer tracks (after a lapse or an error)."""
        known = set(st.unsaved.values()) | {e.entry_id for _, e in st.retries}
        known |= {e.entry_id for e in st.backlog}
        claimed = self.queue.claim_pending(st.name, self.consumer)
        st.backlog.extend(e for e in claimed if e.entry_id not in known)

    def _open(self, namespace: str) -> None:
        assert self._backends is not None
        self.store.clean_partial(namespace)
        version = self.store.latest(namespace)
        if version and not self.store.verify(namespace, version):
            raise CorruptSnapshot(
                f"snapshot {self.store.path(namespace, version)} fails its checksum; "
                "move it aside to resume from its parent"
            )
        snapshot = self.store.path(namespace, version) if version else None
        st = NamespaceState(
            name=namespace,
            backend=self._backends.open(namespace, snapshot),
            version=version,
            lineage=self.store.lineage(namespace, version),
            renewed=time.monotonic(),
        )
        self.queue.ensure_group(namespace)
        publish_version(self.redis, self.keys, namespace, version)
        st.backlog.extend(self.queue.claim_pending(namespace, self.consumer))
        self.namespaces[namespace] = st
        log.info(
            "worker %s owns %s at version %d (%d documents in lineage, %d pending)",
            self.consumer,
            namespace,
            version,
            len(st.lineage),
            len(st.backlog),
        )

    # Documents.

    def _due(self) -> list[Entry]:
        now = time.monotonic()
        out: list[Entry] = []
        for st in self.namespaces.values():
            out.extend(st.backlog)
            st.backlog.clear()
            out.extend(e for t, e in st.retries if t <= now)
            st.retries = [(t, e) for t, e in st.retries if t > now]
        return out

    def _block_ms(self) -> int | None:
        """Block on the stream no longer than the next due snapshot, retry or lease renewal (None:
        do not block)."""
        now = time.monotonic()
        wait = 1.0
        for st in self.namespaces.values():
            if st.backlog:
                return None
            wait = min(wait, st.renewed + self.settings.lease_seconds / 3 - now)
            if st.unsaved_since is not None:
                wait = min(wait, st.unsaved_since + self.settings.snapshot_seconds - now)
            wait = min([wait] + [t - now for t, _ in st.retries])
        return None if wait <= 0.001 else int(wait * 1000)

    def _process(self, entry: Entry) -> None:
        st = self.namespaces.get(entry.namespace)
        if st is None:  # lease lost meanwhile: the entry stays pending for the new owner
            return
        doc_id = entry.doc_id
        if doc_id in st.lineage:  # applied before a crash, not yet acknowledged
            self.docs.mark_applied([doc_id], st.lineage[doc_id])
            self.queue.ack(st.name, [entry.entry_id])
            return
        if doc_id in st.unsaved:
            if st.unsaved[doc_id] != entry.entry_id:
                self.queue.ack(st.name, [entry.entry_id])
            return
        record = self.docs.get(doc_id)
        if record is None:
            self.queue.dead_letter(entry, "document record missing from Redis")
            self.stats.count(st.name, "dead")
            return
        if record.status == "dead":
            self.queue.ack(st.name, [entry.entry_id])
            return
        if record.attempts >= self.settings.max_deliveries:
            last = record.error or "the worker stopped while applying it"
            self._dead(entry, f"gave up after {record.attempts} attempts; last: {last}")
            return
        attempt = self.docs.begin_attempt(doc_id)
        started = time.perf_counter()
        try:
            result = st.backend.ingest(record.text)
        except Exception as exc:  # a bad document must not take the worker down
            log.exception("worker: applying %s failed", doc_id)
            result = IngestResult(applied=False, reason=f"{type(exc).__name__}: {exc}")
        if result.applied:
            self.stats.step(st.name, time.perf_counter() - started, result.tokens)
            st.unsaved[doc_id] = entry.entry_id
            if st.unsaved_since is None:
                st.unsaved_since = time.monotonic()
            if len(st.unsaved) >= self.settings.snapshot_every:
                self._snapshot(st)
            return
        reason = result.reason or "update rejected"
        self.stats.count(st.name, "failed")
        log.warning("worker: %s failed (attempt %d): %s", doc_id, attempt, reason)
        if attempt >= self.settings.max_deliveries:
            self._dead(entry, f"failed {attempt} times; last: {reason}")
        else:
            self.docs.mark_failed(doc_id, reason)
            st.retries.append((time.monotonic() + self.settings.retry_seconds, entry))

    def _dead(self, entry: Entry, reason: str) -> None:
        log.warning("worker: dead-lettering %s: %s", entry.doc_id, reason)
        self.docs.mark_failed(entry.doc_id, reason, dead=True)
        self.queue.dead_letter(entry, reason)
        self.stats.count(entry.namespace, "dead")

    # Snapshots.

    def _snapshot(self, st: NamespaceState) -> None:
        if not st.unsaved or not self._hold(st):
            return
        ids = list(st.unsaved)
        manifest = self.store.write(
            st.name,
            parent=st.version,
            doc_ids=ids,
            lineage_size=len(st.lineage) + len(ids),
            write_state=st.backend.write_state,
            info={
                "mode": self.settings.mode,
                "strategy": self.settings.strategy,
                "base_model": self.settings.model,
                "worker": self.consumer,
            },
        )
        st.version = manifest.version
        st.lineage.update(dict.fromkeys(ids, manifest.version))
        st.unpublished.append((manifest, list(st.unsaved.values())))
        st.unsaved = {}
        st.unsaved_since = None
        self._publish(st)

    def _publish(self, st: NamespaceState) -> None:
        """Announce durable snapshots, mark their documents applied, and only then acknowledge."""
        while st.unpublished:
            manifest, entry_ids = st.unpublished[0]
            publish_version(self.redis, self.keys, st.name, manifest.version)
            self.docs.mark_applied(manifest.doc_ids, manifest.version)
            self.queue.ack(st.name, entry_ids)
            self.stats.count(st.name, "applied", len(manifest.doc_ids))
            st.unpublished.pop(0)
            log.info(
                "worker: %s version %d published (%d documents)",
                st.name,
                manifest.version,
                len(manifest.doc_ids),
            )
