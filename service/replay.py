"""Admin operations queued by the API (configure, rollback, forget), run by the worker between
documents. Rollback and forget rewrite the lineage: each writes a new version (versions only
grow), and forget replays the lineage's later documents without the forgotten one, each
micro-batch the lineage learned together learned together again. A crash between writing that
version and settling it is met by settling it again."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import redis

from adaptation.learner import IngestResult
from service.adapters import AdapterStore, Manifest, publish_version
from service.documents import DocumentRecord, DocumentStore
from service.guard import UpdateGuard
from service.keys import Keys
from service.namespace_state import NamespaceState
from service.namespaces import NamespaceStore, Refused, check_rollback
from service.schemas import Operation

log = logging.getLogger(__name__)


class Owner(Protocol):
    """What an operation needs of the worker that owns the namespace."""

    def ready(self, st: NamespaceState) -> bool:
        """Snapshot what is applied (through the guard) and renew the lease; False if the
        namespace was lost meanwhile."""
        ...

    def keep(self, st: NamespaceState) -> bool:
        """Renew the leases that are due; False if this namespace was lost."""
        ...

    def restore(self, st: NamespaceState, version: int) -> None: ...

    def relearn(self, st: NamespaceState, records: Sequence[DocumentRecord]) -> list[IngestResult]:
        """Learn the documents again as the lineage did: one alone, or several together (a
        recorded micro-batch); a result each."""
        ...

    def write(
        self,
        st: NamespaceState,
        parent: int,
        doc_ids: Sequence[str],
        lineage_size: int,
        **marks: Any,
    ) -> Manifest: ...


class Replay:
    def __init__(
        self,
        owner: Owner,
        client: redis.Redis,
        keys: Keys,
        store: AdapterStore,
        docs: DocumentStore,
        ns_store: NamespaceStore,
        guard: UpdateGuard,
    ) -> None:
        self.owner = owner
        self.redis = client
        self.keys = keys
        self.store = store
        self.docs = docs
        self.ns_store = ns_store
        self.guard = guard

    def run(self, namespaces: dict[str, NamespaceState]) -> None:
        """Each owned namespace's oldest queued operation."""
        for name, op in self.ns_store.next(list(namespaces)).items():
            st = namespaces.get(name)
            if st is not None and self._operate(st, op):
                self.ns_store.done(name, op.request)

    def _operate(self, st: NamespaceState, op: Operation) -> bool:
        """Carry out `op`; False if the lease was lost, which leaves it for the next owner."""
        if not self.owner.ready(st):
            return False
        log.info("worker: %s: %s (request %s)", st.name, op.operation, op.request)
        if op.operation == "configure":
            if self.ns_store.config(st.name) != st.config:
                self.owner.restore(st, st.version)
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
        self.owner.restore(st, target)
        manifest = self.owner.write(
            st, target, [], len(st.lineage), rollback_to=target, request=request
        )
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
        self.owner.restore(st, parent)
        applied: list[str] = []
        retry: list[str] = []
        for group in self._batches(replay):
            if not self.owner.keep(st):
                return False  # the lease lapsed mid-replay: the next owner starts over
            records = [r for _, r in group if r is not None]  # a missing one is retried
            results = self.owner.relearn(st, records) if records else []
            done = {r.id for r, result in zip(records, results, strict=True) if result.applied}
            for other, _ in group:
                (applied if other in done else retry).append(other)
        manifest = self.owner.write(
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
        st.probe_f1 = self.guard.probe_f1(st)
        self._settle(st, manifest, before)
        return True

    def _batches(self, doc_ids: Sequence[str]) -> Iterator[list[tuple[str, DocumentRecord | None]]]:
        """The documents to replay with their records, in order, consecutive ones recorded in
        the same micro-batch grouped (its forgotten members are not among them), the rest
        alone; read as the replay goes, so a long lineage is never held in memory at once."""
        group: list[tuple[str, DocumentRecord | None]] = []
        for doc_id in doc_ids:
            record = self.docs.get(doc_id)
            last = group[-1][1] if group else None
            if group and not (record and record.batch and last and last.batch == record.batch):
                yield group
                group = []
            group.append((doc_id, record))
        if group:
            yield group

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
