"""How a namespace learns a document: one interface, one backend per mode.

The worker owns queueing, snapshots, exactly-once and the update guard; a backend only learns,
answers the guard's probe questions, and writes its state. Modes lora and seal train a LoRA
adapter per namespace (`lora.py`), mode mac keeps a memory bank per namespace (`mac.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from adaptation.learner import Knowledge
from adaptation.weighting.base import Weighter
from service.backends.lora import LoraModels
from service.backends.mac import MacModels
from service.settings import Settings


class Backend(Knowledge, Protocol):
    """A mode in the worker: `Knowledge` (the learning core's interface, which the eval's
    strategies answer to as well) that also writes its state into a snapshot directory and
    lets go of it."""

    def write_state(self, directory: Path) -> None: ...

    def capture_state(self) -> Callable[[Path], None]:
        """A writer of the state as it is now, in memory: later learning does not change what
        it writes, so a snapshot can be written in the background while learning goes on."""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    def open(self, namespace: str, snapshot: Path | None, settings: Settings) -> Backend:
        """The namespace's backend under its own `settings`, restored from `snapshot` (None:
        start fresh)."""
        ...


def open_backends(settings: Settings, weighter: Weighter) -> BackendFactory:
    """Modes lora and seal train LoRA adapters (seal differs only in writing self-edits), mac
    keeps memory banks."""
    if settings.mode == "mac":
        return MacModels.load(settings)
    return LoraModels(settings, weighter)
