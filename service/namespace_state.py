"""What the worker holds for each namespace it owns, shared by the loop and the parts it calls."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.adapters import Manifest
from service.backends import Backend
from service.queue import Entry
from service.schemas import NamespaceConfig
from service.settings import Settings


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
