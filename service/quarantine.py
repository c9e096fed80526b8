"""The worker's startup check, run on a namespace while holding its lease: a crashed writer's
temporary directories go, damaged snapshots are quarantined, and the documents only they held
are queued again, so resuming from the newest intact snapshot loses none."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from service.adapters import AdapterStore
from service.documents import DocumentStore
from service.metrics import WorkerStats
from service.namespaces import NamespaceStore

log = logging.getLogger(__name__)


@dataclass
class Quarantine:
    store: AdapterStore
    docs: DocumentStore
    ns_store: NamespaceStore
    stats: WorkerStats

    def repair(self, namespace: str) -> None:
        """Clean up and quarantine what is damaged. Documents are queued before the snapshots
        move, so a crash in between repeats the check instead of losing them."""
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
