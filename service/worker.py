"""The worker: folds queued documents into each namespace's knowledge, snapshot by snapshot.

What it guarantees (docs/architecture.md, "Service"):
- a document is acknowledged only once the snapshot that holds it is durable and published, so a
  crash loses nothing;
- on start it resumes from the newest snapshot and takes over the namespace's pending entries
  (`XAUTOCLAIM`); a document already in the lineage is skipped, so each is applied exactly once
  per lineage;
- one worker at a time trains a namespace, by holding its lease in Redis;
- a document that keeps failing is retried, then dead-lettered with its reason;
- before a version is published, the update guard asks the namespace's probe questions, and a
  version whose F1 falls by more than epsilon is held back with its documents flagged;
- admin operations queued by the API (configure, rollback, forget) run between documents;
- with `UPTAKE_LEARN_BATCH` above 1, a namespace's queued documents are learned several at a
  time where its backend can (`ingest_together`), each micro-batch inside one snapshot;
- a snapshot is written in a background thread from an in-memory copy of the state
  (`UPTAKE_ASYNC_SNAPSHOTS`, one in flight per namespace), so learning goes on meanwhile; its
  documents are published and acknowledged once it is on disk.

This module keeps the loop; it calls small parts for the rest: how a document is learned is a
backend's business (service/backends), leases are service/leases.py, the startup check
service/quarantine.py, retries and dead letters service/retries.py, the update guard
service/guard.py, and the admin operations with their replay service/replay.py.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import redis

from adaptation.data import Document
from adaptation.learner import IngestResult
from adaptation.weighting.base import Weighter
from service.adapters import AdapterStore, Manifest, publish_version
from service.backends import Backend, BackendFactory, open_backends
from service.backends.lora import build_weighter
from service.documents import SETTLED, DocumentRecord, DocumentStore
from service.guard import UpdateGuard
from service.keys import Keys
from service.leases import Leases
from service.metrics import WorkerStats
from service.namespace_state import NamespaceState, Writing
from service.namespaces import NamespaceStore
from service.quarantine import Quarantine
from service.queue import Entry, Queue
from service.redis_conn import connect
from service.replay import Replay
from service.retries import Retries
from service.schemas import NamespaceConfig
from service.settings import Settings

log = logging.getLogger(__name__)

WRITING_POLL_SECONDS = 0.05


class Worker:
    """The loop over the namespaces this worker holds the leases of; it is also the `Owner` its
    admin operations (`Replay`) act through."""

    def __init__(
        self,
        settings: Settings,
        weighter: Weighter | None = None,
    ) -> None:
        self.settings = settings
        self.redis = connect(settings)
        self.keys = Keys(settings.redis_prefix)
        self.queue = Queue(self.redis, self.keys)
        self.docs = DocumentStore(self.redis, self.keys)
        self.store = AdapterStore(settings.adapters_dir())
        self.stats = WorkerStats(self.redis, self.keys)
        self.ns_store = NamespaceStore(self.redis, self.keys)
        self.consumer = settings.worker_id
        self.namespaces: dict[str, NamespaceState] = {}
        self._weighter = weighter
        self._backends: BackendFactory | None = None
        self._stop = threading.Event()
        self._discovered = 0.0
        self._writes = (
            futures.ThreadPoolExecutor(1, thread_name_prefix="uptake-snapshot")
            if settings.async_snapshots
            else None
        )
        self.leases = Leases(self.redis, self.keys, self.consumer, settings.lease_seconds)
        self.quarantine = Quarantine(self.store, self.docs, self.ns_store, self.stats)
        self.retries = Retries(settings, self.docs, self.queue, self.stats)
        self.guard = UpdateGuard(settings, self.docs, self.queue, self.stats)
        self.replay = Replay(
            self, self.redis, self.keys, self.store, self.docs, self.ns_store, self.guard
        )

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
        """One turn: claim namespaces, apply what is due, read new entries, snapshot what is due.
        A turn that published a version written in the background does not wait on the stream,
        so whoever turns the worker (tests, the bench) sees it at once."""
        self.load()
        self._discover()
        self._renew_leases()
        published = sum(self._publish(st) for st in list(self.namespaces.values()))
        if not self.namespaces:
            self._stop.wait(0.5)
            return 0
        self.replay.run(self.namespaces)
        done = self._process(self._due())
        if self._stop.is_set():
            return done
        writing = [st.writing.manifest for st in self.namespaces.values() if st.writing]
        entries = self.queue.read(
            list(self.namespaces),
            self.consumer,
            self.settings.max_batch,
            None if published or writing else self._block_ms(),
        )
        if writing and not entries:  # nothing to learn: wait for the write instead, briefly
            futures.wait(writing, WRITING_POLL_SECONDS, futures.FIRST_COMPLETED)
        done += self._process(entries)
        for st in list(self.namespaces.values()):
            if self._snapshot_due(st):
                self._snapshot(st)
        return done

    def shutdown(self) -> None:
        for st in list(self.namespaces.values()):
            try:
                self._flush(st)
                self.leases.release(st.name)
            except (redis.RedisError, OSError) as exc:
                log.warning("worker: could not finish %s cleanly (%s)", st.name, exc)
        if self._writes is not None:
            self._writes.shutdown(wait=True)
        log.info("worker %s stopped", self.consumer)

    # Namespaces and leases.

    def _discover(self) -> None:
        now = time.monotonic()
        if self.namespaces and now - self._discovered < 1.0:
            return
        self._discovered = now
        for ns in sorted(self.redis.smembers(self.keys.namespaces)):
            if ns not in self.namespaces and self.leases.take(ns):
                self._open(ns)

    def _renew_leases(self) -> None:
        now = time.monotonic()
        for st in list(self.namespaces.values()):
            if now - st.renewed >= self.settings.lease_seconds / 3:
                self._hold(st)

    def _hold(self, st: NamespaceState) -> bool:
        """Renew the lease. If it lapsed, take it back only if no other worker has it and none has
        written a snapshot meanwhile; otherwise drop the namespace (its entries stay pending)."""
        if self.leases.renew(st.name):
            st.renewed = time.monotonic()
            return True
        if self.leases.take_if_free(st.name) and self.store.latest(st.name) == st.version:
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
        known = st.entries_held() | {e.entry_id for _, e in st.retries}
        known |= {e.entry_id for e in st.backlog}
        claimed = self.queue.claim_pending(st.name, self.consumer)
        st.backlog.extend(e for e in claimed if e.entry_id not in known)

    def _open(self, namespace: str) -> None:
        self.quarantine.repair(namespace)
        version = self.store.latest(namespace)
        config, settings, backend = self._load(namespace, version)
        st = NamespaceState(
            name=namespace,
            backend=backend,
            version=version,
            lineage=self.store.lineage(namespace, version),
            config=config,
            settings=settings,
            renewed=time.monotonic(),
        )
        st.probe_f1 = self.guard.probe_f1(st)
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

    def _load(self, namespace: str, version: int) -> tuple[NamespaceConfig, Settings, Backend]:
        """The namespace's own settings, and a backend holding `version`'s state under them."""
        assert self._backends is not None
        config = self.ns_store.config(namespace)
        settings = config.apply(self.settings)
        snapshot = self.store.path(namespace, version) if version else None
        return config, settings, self._backends.open(namespace, snapshot, settings)

    def restore(self, st: NamespaceState, version: int) -> None:
        """Replace the backend by `version`'s state under the namespace's current settings; the
        guard's baseline becomes that version's F1. Call it with nothing unsaved."""
        config, settings, backend = self._load(st.name, version)
        st.backend.close()
        st.backend, st.config, st.settings, st.version = backend, config, settings, version
        st.lineage = self.store.lineage(st.name, version)
        st.probe_f1 = self.guard.probe_f1(st)

    # Documents.

    def _due(self) -> list[Entry]:
        out: list[Entry] = []
        for st in self.namespaces.values():
            out.extend(st.backlog)
            st.backlog.clear()
            out.extend(self.retries.due(st))
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

    def _process(self, entries: Sequence[Entry]) -> int:
        """Learn the entries in order; how many were taken up before a stop (the rest stay
        pending, for the next start). Consecutive learnable entries of one namespace are
        learned in groups of up to its `learn_batch`, when its backend learns several together
        (`ingest_together`); otherwise one by one."""
        group: list[tuple[Entry, DocumentRecord]] = []
        done = 0
        for entry in entries:
            if self._stop.is_set():
                return done  # the rest, a group in hand included, stay pending
            if group and (
                entry.namespace != group[0][0].namespace
                or entry.doc_id in {e.doc_id for e, _ in group}  # its check needs them learned
            ):
                self._learn(group)
                done, group = done + len(group), []
            self._renew_leases()
            record = self._learnable(entry)
            if record is None:
                done += 1
                continue
            group.append((entry, record))
            if len(group) >= self._group_size(self.namespaces[entry.namespace]):
                self._learn(group)
                done, group = done + len(group), []
        if group:
            self._learn(group)
        return done + len(group)

    def _group_size(self, st: NamespaceState) -> int:
        return st.settings.learn_batch if hasattr(st.backend, "ingest_together") else 1

    def _learnable(self, entry: Entry) -> DocumentRecord | None:
        """The entry's document record if it is to be learned now; otherwise None, with the
        entry settled: acknowledged (already in the lineage, a duplicate, or settled), left to
        the retries (record missing, attempts exhausted), or left pending (lease lost)."""
        st = self.namespaces.get(entry.namespace)
        if st is None:  # lease lost meanwhile: the entry stays pending for the new owner
            return None
        doc_id = entry.doc_id
        if doc_id in st.lineage:  # applied before a crash, not yet acknowledged
            self.docs.mark_applied([doc_id], st.lineage[doc_id])
            self.queue.ack(st.name, [entry.entry_id])
            return None
        held = st.entry_of(doc_id)
        if held is not None:
            if held != entry.entry_id:
                self.queue.ack(st.name, [entry.entry_id])
            return None
        record = self.docs.get(doc_id)
        if record is None:
            self.retries.missing(entry)
            return None
        if record.status in SETTLED:  # dead, held back or forgotten: never applied
            self.queue.ack(st.name, [entry.entry_id])
            return None
        if self.retries.exhausted(entry, record):
            return None
        return record

    def _learn(self, group: Sequence[tuple[Entry, DocumentRecord]]) -> None:
        """Learn one namespace's documents (one, or several together) and record each: applied
        ones join the unsaved, failed ones are retried one by one. A snapshot waits for the
        whole group, so a micro-batch never straddles two versions."""
        st = self.namespaces.get(group[0][0].namespace)
        if st is None:  # lease lost since the checks: the entries stay pending
            return
        items = [self._document(st, record) for _, record in group]
        attempts = [self.docs.begin_attempt(entry.doc_id) for entry, _ in group]
        started = time.perf_counter()
        results = self._ingest(st, items)
        seconds = (time.perf_counter() - started) / len(group)
        for (entry, _), result in zip(group, results, strict=True):
            if result.applied:  # first, so a Redis error below cannot repeat it
                st.unsaved[entry.doc_id] = entry.entry_id
                if st.unsaved_since is None:
                    st.unsaved_since = time.monotonic()
        for (entry, _), attempt, result in zip(group, attempts, results, strict=True):
            if result.applied:
                self.stats.step(st.name, seconds, result.tokens)
                self.docs.end_attempt(
                    entry.doc_id,
                    result.trust,
                    result.sequences,
                    result.self_edit_sequences,
                    result.note,
                    result.batch,
                )
            else:
                self.retries.failed(st, entry, attempt, result.reason or "update rejected")
        if self._snapshot_due(st):  # also mid-turn, so a long backlog does not hold it back
            self._snapshot(st)

    def _document(
        self, st: NamespaceState, record: DocumentRecord, replay: bool = False
    ) -> tuple[Document, float]:
        """The document as its backend learns it, with its trust. Its trust is the one it was first learned
        with, if it was (a forget's replay must learn it as the lineage did), else its source's
        weight in the namespace now; a replayed document without one was learned before trust
        was recorded, at full weight."""
        if record.trust is not None:
            trust = record.trust
        elif replay:
            trust = 1.0
        else:
            weights = self.ns_store.trust(st.name, st.settings.default_trust)
            trust = weights.update_scale(record.source)
        title = record.metadata.get("title")
        doc = Document(
            id=record.id,
            text=record.text,
            title=(title.strip() or None) if isinstance(title, str) else None,
            source=record.source,
            self_edits=record.self_edits,
        )
        return doc, trust

    def _ingest(
        self, st: NamespaceState, items: Sequence[tuple[Document, float]]
    ) -> list[IngestResult]:
        """A result per document: several learned together by a backend that can
        (`ingest_together`), else one by one. An error fails them all."""
        together = getattr(st.backend, "ingest_together", None)
        try:
            if len(items) > 1 and together is not None:
                return together(items)
            return [st.backend.ingest(doc, trust) for doc, trust in items]
        except Exception as exc:  # a bad document must not take the worker down
            log.exception("worker: applying %s failed", ", ".join(doc.id for doc, _ in items))
            return [IngestResult(applied=False, reason=f"{type(exc).__name__}: {exc}")] * len(items)

    # Snapshots.

    def _snapshot_due(self, st: NamespaceState) -> bool:
        """After `snapshot_every` documents, or `snapshot_seconds` since the first unsaved one."""
        if st.unsaved_since is None:
            return False
        waited = time.monotonic() - st.unsaved_since
        return (
            len(st.unsaved) >= self.settings.snapshot_every
            or waited >= self.settings.snapshot_seconds
        )

    def _snapshot(self, st: NamespaceState) -> None:
        """Write the applied documents as the next version, unless the update guard holds it
        back, and publish it."""
        if not st.unsaved or not self._hold(st):
            return
        self._settle(st)  # the write in flight, if any, is this one's parent
        f1 = self.guard.probe_f1(st)
        regression = self.guard.regression(st, f1)
        if regression:  # keep serving the current version
            self.guard.hold_back(st, regression)
            self.restore(st, st.version)
            return
        unsaved = dict(st.unsaved)
        size = len(st.lineage) + len(unsaved)
        state = st.backend.write_state if self._writes is None else st.backend.capture_state()
        write = self._writer(st, st.version, list(unsaved), size, state, probe_f1=f1)
        if self._writes is None:
            self._written(st, write(), unsaved, f1)
        else:
            st.writing = Writing(self._writes.submit(write), unsaved, f1)
        st.unsaved = {}
        st.unsaved_since = None
        self._publish(st)

    def _settle(self, st: NamespaceState, wait: bool = True) -> None:
        """Take in the snapshot written in the background, once done (`wait`: wait for it). If
        it failed, its documents are unsaved again and the error is raised, as a snapshot
        written in the loop raises it."""
        writing = st.writing
        if writing is None or not (wait or writing.manifest.done()):
            return
        st.writing = None
        try:
            manifest = writing.manifest.result()
        except BaseException:
            st.unsaved = {**writing.unsaved, **st.unsaved}
            st.unsaved_since = st.unsaved_since or time.monotonic()
            raise
        self._written(st, manifest, writing.unsaved, writing.probe_f1)

    def _written(
        self, st: NamespaceState, manifest: Manifest, unsaved: dict[str, str], f1: float | None
    ) -> None:
        st.version = manifest.version
        st.lineage.update(dict.fromkeys(unsaved, manifest.version))
        st.probe_f1 = f1
        st.unpublished.append((manifest, list(unsaved.values())))

    def flush(self) -> None:
        """Snapshot and publish what every namespace has applied, now rather than when due."""
        for st in list(self.namespaces.values()):
            self._flush(st)

    def _flush(self, st: NamespaceState) -> None:
        """Snapshot what is applied (through the guard), wait for the write and publish it."""
        self._snapshot(st)
        self._settle(st)
        self._publish(st)

    def _publish(self, st: NamespaceState) -> int:
        """Announce durable snapshots, mark their documents applied, and only then acknowledge;
        how many versions were published."""
        self._settle(st, wait=False)
        published = len(st.unpublished)
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
        return published

    def write(
        self,
        st: NamespaceState,
        parent: int,
        doc_ids: Sequence[str],
        lineage_size: int,
        **marks: Any,
    ) -> Manifest:
        """Snapshot the backend as the namespace's next version. `marks` (the guard's probe F1,
        an operation's request and what it did) are recorded in the manifest's info."""
        return self._writer(st, parent, doc_ids, lineage_size, st.backend.write_state, **marks)()

    def _writer(
        self,
        st: NamespaceState,
        parent: int,
        doc_ids: Sequence[str],
        lineage_size: int,
        write_state: Callable[[Path], None],
        **marks: Any,
    ) -> Callable[[], Manifest]:
        """`write`, ready to run here or in the background: its record is taken now."""
        info = {
            "mode": st.settings.mode,
            "strategy": st.settings.strategy,
            "lr": st.settings.lr,
            "steps_per_doc": st.settings.steps_per_doc,
            "base_model": self.settings.model,
            "worker": self.consumer,
        }
        if st.settings.mode == "seal":
            info["self_edit_k"] = st.settings.self_edit_k
            info["self_edit_prompt"] = st.settings.self_edit_prompt
            info["self_edit_tokens"] = st.settings.self_edit_tokens
            if st.settings.self_edit_best_of > 1:
                info["self_edit_best_of"] = st.settings.self_edit_best_of
        if st.settings.source_tags:
            info["source_tags"] = True
        if st.settings.learn_batch > 1:
            info["learn_batch"] = st.settings.learn_batch
        if st.settings.rehearse:
            info["rehearse"] = st.settings.rehearse
            info["rehearsal_window"] = st.settings.rehearsal_window
        info.update((key, value) for key, value in marks.items() if value is not None)
        ids = list(doc_ids)

        def write() -> Manifest:
            try:
                manifest = self.store.write(
                    st.name,
                    parent=parent,
                    doc_ids=ids,
                    lineage_size=lineage_size,
                    write_state=write_state,
                    info=info,
                )
            except OSError as exc:
                # Retried every second (run_forever) with the documents left queued; the report
                # lets /v1/status and /metrics say why nothing is being applied.
                self.stats.problem(st.name, exc, seconds_valid=self.settings.lease_seconds)
                raise
            self.stats.solved(st.name)
            return manifest

        return write

    # The `Owner` the admin operations (service/replay.py) act through.

    def ready(self, st: NamespaceState) -> bool:
        self._flush(st)  # what is applied already goes first
        return self.namespaces.get(st.name) is st and self._hold(st)

    def keep(self, st: NamespaceState) -> bool:
        self._renew_leases()
        return self.namespaces.get(st.name) is st

    def relearn(self, st: NamespaceState, records: Sequence[DocumentRecord]) -> list[IngestResult]:
        return self._ingest(st, [self._document(st, r, replay=True) for r in records])
