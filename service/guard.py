"""The update guard: before a version is published, the backend answers the namespace's probe
questions, and a version whose F1 falls by more than `guard_epsilon` below the current one's is
held back, its documents flagged for review."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from adaptation.metrics import score
from service.documents import DocumentStore
from service.metrics import WorkerStats
from service.namespace_state import NamespaceState
from service.namespaces import default_probes
from service.queue import Queue
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class UpdateGuard:
    settings: Settings
    docs: DocumentStore
    queue: Queue
    stats: WorkerStats

    def probe_f1(self, st: NamespaceState) -> float | None:
        """Closed-book F1 of the backend as it stands on the namespace's probe questions (its
        own, else the service's); None when there are none, which turns the guard off."""
        probes = st.config.probes or default_probes(self.settings)
        if not probes:
            return None
        answers = st.backend.answer([p.question for p in probes])
        return score(answers, [p.answers for p in probes])["f1"]

    def regression(self, st: NamespaceState, f1: float | None) -> str | None:
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

    def hold_back(self, st: NamespaceState, reason: str) -> None:
        """Flag the unsaved documents and acknowledge their entries (a retry would be held back
        again). The caller then restores the backend to the published state."""
        log.warning("worker: %s: holding back %s: %s", st.name, ", ".join(st.unsaved), reason)
        self.docs.mark(list(st.unsaved), "held", reason)
        self.queue.ack(st.name, list(st.unsaved.values()))
        self.stats.count(st.name, "held", len(st.unsaved))
        st.unsaved = {}
        st.unsaved_since = None
