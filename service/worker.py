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
- admin operations queued by the API (configure, rollback, forget) run between documents.

How a document is learned is a backend's business (`Backend`, the learning core's `Knowledge`
plus snapshots); the `lora` and `seal` modes ship here as a thin wrapper over the learning
core's `Learner`, which `uptake eval` learns through too (each namespace trains its own LoRA
adapter on one shared base model; seal also has the base write self-edits for documents sent
without any), the `mac` mode in service/mac_mode.py.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis
import torch
from peft import PeftModel

from adaptation.answering import SCORED_ANSWER_TOKENS, generate_answers
from adaptation.data import Document
from adaptation.learner import (
    IngestResult,
    Knowledge,
    Learner,
    LearnSettings,
    SelfEditWriting,
    fresh_adapter,
)
from adaptation.metrics import score
from adaptation.modeling import RNG_LOCK, load_base, save_adapter
from adaptation.weighting.base import Weighter
from service.adapters import AdapterStore, Manifest, publish_version
from service.documents import SETTLED, DocumentRecord, DocumentStore
from service.keys import Keys
from service.metrics import WorkerStats
from service.namespaces import NamespaceStore, Refused, check_rollback, default_probes
from service.queue import Entry, Queue
from service.redis_conn import connect
from service.schemas import NamespaceConfig, Operation
from service.settings import Settings

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
# A fresh adapter always starts from this seed, so a replay from version 0 (forgetting a
# lineage's first document) starts where the lineage did.
LORA_SEED = 0

# Renew (or re-take) a lease only while we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Backend(Knowledge, Protocol):
    """A mode in the worker: `Knowledge` (the learning core's interface, which the eval's
    strategies answer to as well) that also writes its state into a snapshot directory and
    lets go of it. The worker owns queueing, snapshots, exactly-once and the update guard; a
    backend only learns, answers the guard's probe questions, and writes its state."""

    def write_state(self, directory: Path) -> None: ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    def open(self, namespace: str, snapshot: Path | None, settings: Settings) -> Backend:
        """The namespace's backend under its own `settings`, restored from `snapshot` (None:
        start fresh)."""
        ...


def learn_settings(settings: Settings) -> LearnSettings:
    """How a namespace learns a document; mode seal also writes self-edits for documents sent
    without any."""
    write = (
        SelfEditWriting(settings.self_edit_k, settings.self_edit_prompt, settings.self_edit_tokens)
        if settings.mode == "seal"
        else None
    )
    return LearnSettings(
        chunk_chars=settings.chunk_chars,
        max_doc_tokens=settings.max_doc_tokens,
        tag_salt="" if settings.source_tags else None,
        write=write,
    )


class LoraModels:
    """One base model shared by every namespace's trainable LoRA adapter."""

    def __init__(self, settings: Settings, weighter: Weighter) -> None:
        self.settings = settings
        self.weighters = {settings.strategy: weighter}
        self.base, self.tokenizer = load_base(settings.model, settings.device)
        self.model: PeftModel | None = None
        self._opened = 0

    def weighter(self, settings: Settings) -> Weighter:
        """The weighter of a namespace's strategy, built once per strategy."""
        if settings.strategy not in self.weighters:
            self.weighters[settings.strategy] = build_weighter(settings)
        return self.weighters[settings.strategy]

    def open(self, namespace: str, snapshot: Path | None, settings: Settings) -> LoraBackend:
        # A new name each time: a namespace's state is replaced by opening the new one first.
        self._opened += 1
        name = f"ns_{namespace}_{self._opened}"
        if snapshot is None:
            self.model = fresh_adapter(
                self.model or self.base, self.settings.lora(), LORA_SEED, name
            )
        elif self.model is None:
            with RNG_LOCK:  # loading initialises at random first (see RNG_LOCK)
                self.model = PeftModel.from_pretrained(
                    self.base, str(snapshot), adapter_name=name, is_trainable=True
                )
        else:
            with RNG_LOCK:
                self.model.load_adapter(str(snapshot), adapter_name=name, is_trainable=True)
        return LoraBackend(self, name, snapshot, settings)


class LoraBackend:
    """One namespace's adapter, learned by the learning core's `Learner`; the optimizer state
    rides in snapshots beside the adapter."""

    def __init__(
        self, models: LoraModels, adapter_name: str, snapshot: Path | None, settings: Settings
    ) -> None:
        assert models.model is not None
        self.models = models
        self.model = models.model
        self.name = adapter_name
        self.model.set_adapter(adapter_name)  # only this adapter's weights are trainable now
        self.learner = Learner(
            self.model,
            models.tokenizer,
            models.weighter(settings),
            settings.update(),
            learn_settings(settings),
        )
        if snapshot is not None:
            updater = self.learner.updater
            state = torch.load(
                snapshot / OPTIMIZER_FILE, map_location=updater.device, weights_only=True
            )
            updater.load_state_dict(state)

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        self.model.set_adapter(self.name)
        return self.learner.learn(doc, trust)

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        self.model.set_adapter(self.name)
        return generate_answers(
            self.model,
            self.models.tokenizer,
            questions,
            contexts=contexts,
            max_new_tokens=SCORED_ANSWER_TOKENS,
        )

    def memory_bytes(self) -> int:
        return self.learner.memory_bytes()

    def write_state(self, directory: Path) -> None:
        save_adapter(self.model, directory, adapter_name=self.name)
        torch.save(self.learner.updater.state_dict(), directory / OPTIMIZER_FILE)

    def close(self) -> None:
        self.model.delete_adapter(self.name)


def build_weighter(settings: Settings) -> Weighter:
    from adaptation.weighting import make_weighter

    return make_weighter(settings.strategy, path=settings.weighter_path())


def open_backends(settings: Settings, weighter: Weighter) -> BackendFactory:
    """Modes lora and seal train LoRA adapters (seal differs only in writing self-edits), mac
    keeps memory banks."""
    if settings.mode == "mac":
        from service.mac_mode import MacModels  # it builds on this module

        return MacModels.load(settings)
    return LoraModels(settings, weighter)


@dataclass
class NamespaceState:
    name: str
    backend: Backend
    version: int
    lineage: dict[str, int]  # doc id -> the version that added it
    config: NamespaceConfig
    settings: Settings  # the service's, with the namespace's own choices in place
    probe_f1: float | None = None  # the guard's baseline, the current version's (None: no guard)
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
        self._run_operations()
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
        self._repair(namespace)
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
        st.probe_f1 = self._probe_f1(st)
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

    def _repair(self, namespace: str) -> None:
        """The startup check, run while holding the lease: remove a crashed writer's temporary
        directories, quarantine damaged snapshots, and queue again the documents only they held,
        so resuming from the newest intact snapshot loses none. Documents are queued before the
        snapshots move, so a crash in between repeats the check instead of losing them."""
        self.store.clean_partial(namespace)
        damaged = self.store.damaged(namespace)
        if not damaged:
            return
        lost = {v.version for v in damaged}
        kept = self.store.lineage(
            namespace, max(set(self.store.versions(namespace)) - lost, default=0)
        )
        named = {doc_id for d in damaged for doc_id in d.doc_ids}
        candidates = (named | self.docs.applied_in(namespace, lost)) - kept.keys()
        requeued = self.docs.requeue(namespace, sorted(candidates))
        self._reconcile(namespace, kept)
        moved = self.store.quarantine(namespace, damaged)
        self.stats.count(namespace, "quarantined", len(moved))
        self.stats.count(namespace, "requeued", len(requeued))
        log.error(
            "worker: %s: quarantined damaged snapshots %s; %d documents queued again",
            namespace,
            ", ".join(p.name for p in moved),
            len(requeued),
        )

    def _load(self, namespace: str, version: int) -> tuple[NamespaceConfig, Settings, Backend]:
        """The namespace's own settings, and a backend holding `version`'s state under them."""
        assert self._backends is not None
        config = self.ns_store.config(namespace)
        settings = config.apply(self.settings)
        snapshot = self.store.path(namespace, version) if version else None
        return config, settings, self._backends.open(namespace, snapshot, settings)

    def _restore(self, st: NamespaceState, version: int) -> None:
        """Replace the backend by `version`'s state under the namespace's current settings; the
        guard's baseline becomes that version's F1. Call it with nothing unsaved."""
        config, settings, backend = self._load(st.name, version)
        st.backend.close()
        st.backend, st.config, st.settings, st.version = backend, config, settings, version
        st.lineage = self.store.lineage(st.name, version)
        st.probe_f1 = self._probe_f1(st)

    def _reconcile(self, namespace: str, kept: dict[str, int]) -> None:
        """A quarantined version may have held a forget or a rollback, whose documents are back
        in the lineage resumed: a forgotten one is forgotten again (it must not resurface), and
        a rolled-back one is recorded as applied where the lineage now holds it."""
        back: dict[int, list[str]] = defaultdict(list)
        for doc_id, record in self.docs.statuses(kept).items():
            if record is not None and record.status == "forgotten":
                self.ns_store.request(namespace, "forget", document=doc_id)
            elif record is not None and record.status == "rolled_back":
                back[kept[doc_id]].append(doc_id)
        for version, doc_ids in back.items():
            self.docs.mark_applied(doc_ids, version)
            log.warning(
                "worker: %s: a quarantined version had rolled back %s; version %d holds them again",
                namespace,
                ", ".join(doc_ids),
                version,
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
        if record.status in SETTLED:  # dead, held back or forgotten: never applied
            self.queue.ack(st.name, [entry.entry_id])
            return
        if record.attempts >= self.settings.max_deliveries:
            last = record.error or "the worker stopped while applying it"
            self._dead(entry, f"gave up after {record.attempts} attempts; last: {last}")
            return
        doc, trust = self._document(st, record)
        attempt = self.docs.begin_attempt(doc_id)
        started = time.perf_counter()
        result = self._ingest(st, doc, trust)
        if result.applied:
            self.stats.step(st.name, time.perf_counter() - started, result.tokens)
            st.unsaved[doc_id] = entry.entry_id  # first, so a Redis error now cannot repeat it
            self.docs.end_attempt(
                doc_id, result.trust, result.sequences, result.self_edit_sequences, result.note
            )
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

    def _ingest(self, st: NamespaceState, doc: Document, trust: float) -> IngestResult:
        try:
            return st.backend.ingest(doc, trust)
        except Exception as exc:  # a bad document must not take the worker down
            log.exception("worker: applying %s failed", doc.id)
            return IngestResult(applied=False, reason=f"{type(exc).__name__}: {exc}")

    def _dead(self, entry: Entry, reason: str) -> None:
        log.warning("worker: dead-lettering %s: %s", entry.doc_id, reason)
        self.docs.mark_failed(entry.doc_id, reason, dead=True)
        self.queue.dead_letter(entry, reason)
        self.stats.count(entry.namespace, "dead")

    # Snapshots.

    def _snapshot(self, st: NamespaceState) -> None:
        """Write the applied documents as the next version, unless the update guard holds it
        back, and publish it."""
        if not st.unsaved or not self._hold(st):
            return
        f1 = self._probe_f1(st)
        regression = self._regression(st, f1)
        if regression:
            self._hold_back(st, regression)
            return
        ids = list(st.unsaved)
        manifest = self._write(st, st.version, ids, len(st.lineage) + len(ids), probe_f1=f1)
        st.version = manifest.version
        st.lineage.update(dict.fromkeys(ids, manifest.version))
        st.probe_f1 = f1
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

    def _write(
        self,
        st: NamespaceState,
        parent: int,
        doc_ids: Sequence[str],
        lineage_size: int,
        **marks: Any,
    ) -> Manifest:
        """Snapshot the backend as the namespace's next version. `marks` (the guard's probe F1,
        an operation's request and what it did) are recorded in the manifest's info."""
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
        if st.settings.source_tags:
            info["source_tags"] = True
        info.update((key, value) for key, value in marks.items() if value is not None)
        try:
            manifest = self.store.write(
                st.name,
                parent=parent,
                doc_ids=doc_ids,
                lineage_size=lineage_size,
                write_state=st.backend.write_state,
                info=info,
            )
        except OSError as exc:
            # Retried every second (run_forever) with the documents left queued; the report lets
            # /v1/status and /metrics say why nothing is being applied.
            self.stats.problem(st.name, exc, seconds_valid=self.settings.lease_seconds)
            raise
        self.stats.solved(st.name)
        return manifest

    # The update guard.

    def _probe_f1(self, st: NamespaceState) -> float | None:
        """Closed-book F1 of the backend as it stands on the namespace's probe questions (its
        own, else the service's); None when there are none, which turns the guard off."""
        probes = st.config.probes or default_probes(self.settings)
        if not probes:
            return None
        answers = st.backend.answer([p.question for p in probes])
        return score(answers, [p.answers for p in probes])["f1"]

    def _regression(self, st: NamespaceState, f1: float | None) -> str | None:
        """Why the applied documents must be held back, or None if the guard lets them pass."""
        epsilon = st.settings.guard_epsilon
        if f1 is None or st.probe_f1 is None or st.probe_f1 - f1 <= epsilon:
            return None
        return (
            f"update guard: probe F1 would fall from {st.probe_f1:.3f} (version {st.version}) "
            f"to {f1:.3f}, more than guard_epsilon={epsilon:g}, with this document among the "
            "update's; held back. Review it, then forget it (DELETE /v1/documents/{id}) or send "
            "it again under a new id"
        )

    def _hold_back(self, st: NamespaceState, reason: str) -> None:
        """Keep serving the current version: flag the documents, acknowledge their entries (a
        retry would be held back again), and restore the backend to the published state."""
        log.warning("worker: %s: holding back %s: %s", st.name, ", ".join(st.unsaved), reason)
        self.docs.mark(list(st.unsaved), "held", reason)
        self.queue.ack(st.name, list(st.unsaved.values()))
        self.stats.count(st.name, "held", len(st.unsaved))
        st.unsaved = {}
        st.unsaved_since = None
        self._restore(st, st.version)

    # Admin operations, queued by the API.

    def _run_operations(self) -> None:
        """Each owned namespace's oldest queued operation, between documents."""
        for name, op in self.ns_store.next(list(self.namespaces)).items():
            st = self.namespaces.get(name)
            if st is not None and self._operate(st, op):
                self.ns_store.done(name, op.request)

    def _operate(self, st: NamespaceState, op: Operation) -> bool:
        """Carry out `op`; False if the lease was lost, which leaves it for the next owner."""
        self._snapshot(st)  # what is applied already goes first, through the guard
        if self.namespaces.get(st.name) is not st or not self._hold(st):
            return False
        log.info("worker: %s: %s (request %s)", st.name, op.operation, op.request)
        if op.operation == "configure":
            if self.ns_store.config(st.name) != st.config:
                self._restore(st, st.version)
            return True
        current = self.store.manifest(st.name, st.version) if st.version else None
        if current is not None and current.info.get("request") == op.request:
            # Written before a crash that came before its entry was deleted: settle it again,
            # against the version that was current before it (the newest older one).
            previous = max((v for v in self.store.versions(st.name) if v < st.version), default=0)
            self._settle(st, current, self.store.lineage(st.name, previous))
            return True
        if op.operation == "rollback":
            return self._rollback(st, op.version or 0, op.request)
        return self._forget(st, op.document or "", op.request)

    def _rollback(self, st: NamespaceState, target: int, request: str) -> bool:
        """Make `target` current as a new version whose parent it is: versions stay increasing,
        the newest is what is served and resumed, and the lineage continues from `target`."""
        try:
            check_rollback(self.store, self.docs, st.name, target)
        except Refused as exc:
            log.warning("worker: %s: rollback refused: %s", st.name, exc.detail)
            return True
        before = st.lineage
        self._restore(st, target)
        manifest = self._write(st, target, [], len(st.lineage), rollback_to=target, request=request)
        st.version = manifest.version
        self._settle(st, manifest, before)
        return True

    def _forget(self, st: NamespaceState, doc_id: str, request: str) -> bool:
        """Restore the snapshot before the document and replay the lineage's later documents
        without it; the result is a new version whose manifest records the forget."""
        if doc_id not in st.lineage:  # never learned (queued, held, dead, rolled back): no replay
            self.docs.forget([doc_id])
            return True
        added = st.lineage[doc_id]
        replay = [d for m in self._ancestry(st, added) for d in m.doc_ids if d != doc_id]
        parent = self.store.manifest(st.name, added).parent
        before = st.lineage
        self._restore(st, parent)
        applied: list[str] = []
        retry: list[str] = []
        for other in replay:
            self._renew_leases()
            if self.namespaces.get(st.name) is not st:
                return False  # the lease lapsed mid-replay: the next owner starts over
            record = self.docs.get(other)
            result = (
                self._ingest(st, *self._document(st, record, replay=True))
                if record is not None
                else IngestResult(applied=False, reason="record missing")
            )
            (applied if result.applied else retry).append(other)
        manifest = self._write(
            st,
            parent,
            applied,
            len(st.lineage) + len(applied),
            forgotten=[doc_id],
            requeued=retry or None,
            request=request,
        )
        st.version = manifest.version
        st.lineage.update(dict.fromkeys(applied, manifest.version))
        st.probe_f1 = self._probe_f1(st)
        self._settle(st, manifest, before)
        return True

    def _ancestry(self, st: NamespaceState, oldest: int) -> list[Manifest]:
        """Manifests from `oldest` (an ancestor of the current version) to the current one."""
        chain = [self.store.manifest(st.name, st.version)]
        while chain[-1].version != oldest:
            chain.append(self.store.manifest(st.name, chain[-1].parent))
        return chain[::-1]

    def _settle(self, st: NamespaceState, manifest: Manifest, before: dict[str, int]) -> None:
        """Publish an operation's version and bring document statuses in line with its lineage
        (idempotent, so a crash can repeat it): a replay's failures are queued again, the
        forgotten are forgotten, what the version dropped is rolled back, and every document
        in it names the version that now holds it."""
        publish_version(self.redis, self.keys, st.name, manifest.version)
        forgotten = manifest.info.get("forgotten", [])
        retry = manifest.info.get("requeued", [])
        self.docs.requeue(st.name, retry)
        kept = st.lineage.keys() | set(forgotten) | set(retry)
        gone = [doc_id for doc_id in before if doc_id not in kept]
        if gone:
            self.docs.mark(
                gone,
                "rolled_back",
                f"not in version {manifest.version}, which restored version {manifest.parent}; "
                "send it again under a new id to learn it again",
            )
        moved: dict[int, list[str]] = defaultdict(list)
        for doc_id, version in st.lineage.items():
            if before.get(doc_id) != version:
                moved[version].append(doc_id)
        for version, ids in moved.items():
            self.docs.mark_applied(ids, version)
        self.docs.forget(forgotten)
        log.info(
            "worker: %s version %d published (rollback_to %s, forgotten %s)",
            st.name,
            manifest.version,
            manifest.info.get("rollback_to"),
            forgotten,
        )
