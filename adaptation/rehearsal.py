"""Rehearsal: a bounded memory of the documents a learner has learned, from which a few earlier
ones are learned again beside each new one, so that what came first is not overwritten by what
came after (experience replay).

The choice of which documents to rehearse depends only on the new document's id and on the
memory, which holds the lineage's earlier documents in learning order. A forget's replay restores
the parent version's memory and relearns the lineage's later documents in order, so it makes the
same choices as a lineage that never saw the forgotten document, and reaches the same weights.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


def doc_seed(doc_id: str) -> int:
    """A seed from a document's id: the same document makes the same random choices wherever
    and whenever it is learned."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Remembered:
    """A learned document as it is rehearsed: its text, its self-edit training sequences (kept,
    so written ones are not written again) and the trust it was learned with."""

    id: str
    text: str
    title: str | None
    source: str | None
    trust: float
    edits: tuple[str, ...] = ()


class RehearsalMemory:
    """The most recent `window` learned documents, oldest first."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._entries: deque[Remembered] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Remembered]:
        return iter(self._entries)

    def remember(self, entry: Remembered) -> None:
        """Add the newest document. One learned again under the same id (best-of-k's
        candidates) is kept once, as last learned, so it is never rehearsed twice as often."""
        kept = [e for e in self._entries if e.id != entry.id]
        self._entries = deque([*kept, entry], maxlen=self.window)

    def choose(self, doc_id: str, k: int) -> list[Remembered]:
        """Up to `k` earlier documents (never `doc_id` itself), drawn with a seed from `doc_id`
        and returned in learning order."""
        candidates = [i for i, e in enumerate(self._entries) if e.id != doc_id]
        picked = random.Random(doc_seed(doc_id)).sample(candidates, min(k, len(candidates)))
        return [self._entries[i] for i in sorted(picked)]

    def clear(self) -> None:
        self._entries.clear()

    def dumps(self) -> str:
        """One JSON object per line, oldest first ("" when empty)."""
        return "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in self._entries)

    def save(self, path: Path) -> None:
        path.write_text(self.dumps(), encoding="utf-8")

    def load(self, path: Path) -> None:
        """Replace the memory by the file's documents (the newest `window` of them)."""
        self._entries.clear()
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    raw = json.loads(line)
                    self._entries.append(Remembered(**{**raw, "edits": tuple(raw["edits"])}))
