"""What the worker holds for each namespace it owns, shared by the loop and the parts it calls."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from service.adapters import Manifest
from service.backends import Backend
from service.queue import Entry
from service.schemas import NamespaceConfig
from service.settings import Settings


@dataclass(frozen=True)
class Writing:
    """A snapshot being written in the background (UPTAKE_ASYNC_SNAPSHOTS)."""

    manifest: Future[Manifest]
    unsaved: dict[str, str]  # what it holds beyond its parent: doc id -> stream entry id
    probe_f1: float | None


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
    # At most one snapshot in flight: its version is the next one's parent.
    writing: Writing | None = None
    unpublished: list[tuple[Manifest, list[str]]] = field(default_factory=list)
    backlog: deque[Entry] = field(default_factory=deque)
    retries: list[tuple[float, Entry]] = field(default_factory=list)
    renewed: float = 0.0

    def entry_of(self, doc_id: str) -> str | None:
        """The stream entry a document was learned from, while it is applied but not yet in a
        written snapshot (None: it is not)."""
        if doc_id in self.unsaved:
            return self.unsaved[doc_id]
        return self.writing.unsaved.get(doc_id) if self.writing is not None else None

    def entries_held(self) -> set[str]:
        """The stream entries of documents applied but not yet published."""
        held = set(self.unsaved.values())
        return held | set(self.writing.unsaved.values()) if self.writing is not None else held
