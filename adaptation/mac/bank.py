"""The memory bank: one fp16 T x d modulation per document, appended at ingest.

Entries are never edited: a document is appended once (a repeat of its id is a no-op) and can
only be dropped, for forgetting. Every change bumps the version, so readers can tell when the
memory they aggregated over is stale.

A bank may also hold a retrieval key per entry (a unit embedding of the document's text, for
mac+rag): either every entry has one or none does, so keys follow their entries through appends,
drops and saves. `networks` names the networks that wrote the entries (`networks_identity`), so
a bank is never read by networks it does not belong to.

On disk a bank is a directory: the tensors in a safetensors file named by version, and
index.json naming that file, the ids in row order, the version and the networks. The index is
replaced last and atomically, so a crash mid-save leaves the previous bank loadable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "index.json"
STORAGE_DTYPE = torch.float16


@dataclass(frozen=True)
class BankIndex:
    """What a saved bank's index says, read without loading its tensors."""

    entries: int
    num_tokens: int
    width: int
    key_width: int
    networks: str | None

    @property
    def entry_nbytes(self) -> int:
        """One entry on disk: its modulation and its retrieval key, if the bank keeps keys."""
        return (self.num_tokens * self.width + self.key_width) * STORAGE_DTYPE.itemsize

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> BankIndex:
        src = Path(directory)
        if not (src / INDEX).exists():
            raise FileNotFoundError(f"no memory bank at {src} (missing {INDEX})")
        raw = json.loads((src / INDEX).read_text(encoding="utf-8"))
        return cls(
            entries=len(raw["ids"]),
            num_tokens=int(raw["num_tokens"]),
            width=int(raw["width"]),
            key_width=int(raw.get("key_width", 0)),
            networks=raw.get("networks"),
        )


class MemoryBank:
    def __init__(self, num_tokens: int, width: int, networks: str | None = None) -> None:
        self.num_tokens = num_tokens
        self.width = width
        self.networks = networks
        self.version = 0
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._data = torch.empty((0, num_tokens, width), dtype=STORAGE_DTYPE)
        self._keys: torch.Tensor | None = None  # [capacity, key width] once the first key comes

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._row

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def num_entries(self) -> int:
        return len(self._ids)

    @property
    def key_width(self) -> int:
        return 0 if self._keys is None else self._keys.shape[1]

    @property
    def keyed(self) -> bool:
        """Whether every entry has a retrieval key (an empty bank takes either kind)."""
        return self._keys is not None

    @property
    def entry_nbytes(self) -> int:
        return (self.num_tokens * self.width + self.key_width) * STORAGE_DTYPE.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_entries * self.entry_nbytes

    def append(
        self, doc_id: str, modulation: torch.Tensor, key: torch.Tensor | None = None
    ) -> bool:
        """Store a document's T x d modulation (and its retrieval key, if the bank keeps keys);
        False (and no change) if the id is already held."""
        if modulation.shape != (self.num_tokens, self.width):
            raise ValueError(
                f"modulation of shape {tuple(modulation.shape)}; this bank holds "
                f"{self.num_tokens} x {self.width}"
            )
        if doc_id in self._row:
            return False
        n = len(self._ids)
        if not n:
            self._keys = None  # an empty bank takes either kind
        elif (key is None) == self.keyed:
            raise ValueError(
                "every entry of a bank has a retrieval key or none does; this bank keeps "
                + ("keys" if self.keyed else "none")
            )
        if key is not None and self._keys is None:
            self._keys = torch.empty((self._data.shape[0], key.shape[-1]), dtype=STORAGE_DTYPE)
        if n == self._data.shape[0]:  # grow geometrically: appends stay amortised O(1)
            size = max(16, 2 * n)
            self._data = _grown(self._data, size)
            if self._keys is not None:
                self._keys = _grown(self._keys, size)
        self._data[n] = modulation.detach().to("cpu", STORAGE_DTYPE)
        if key is not None and self._keys is not None:
            self._keys[n] = key.detach().to("cpu", STORAGE_DTYPE)
        self._ids.append(doc_id)
        self._row[doc_id] = n
        self.version += 1
        return True

    def drop(self, doc_id: str) -> bool:
        """Forget a document; False if it was not held."""
        row = self._row.pop(doc_id, None)
        if row is None:
            return False
        # Copy rather than shift in place: a reader may still hold a view from tensor().
        self._data = torch.cat([self._data[:row], self._data[row + 1 :]])
        if self._keys is not None:
            self._keys = torch.cat([self._keys[:row], self._keys[row + 1 :]])
        del self._ids[row]
        for i in range(row, len(self._ids)):
            self._row[self._ids[i]] = i
        self.version += 1
        return True

    def tensor(self) -> torch.Tensor:
        """All entries, [N, T, d] fp16, in append order. A view that later appends and drops
        leave untouched (they write past its end or copy); read it, don't write it."""
        return self._data[: len(self._ids)]

    def select(self, doc_ids: Iterable[str]) -> torch.Tensor:
        """The entries of the given ids that the bank holds, in the order given; unknown ids are
        skipped (a retrieved document may not be amortised yet)."""
        rows = [self._row[i] for i in doc_ids if i in self._row]
        return self._data[torch.tensor(rows, dtype=torch.long)]

    def search(self, queries: torch.Tensor, k: int, min_score: float = -1.0) -> list[list[str]]:
        """The ids of the k entries whose keys are nearest each unit query [B, e] (cosine), best
        first; fewer when the bank is smaller or fewer score at least `min_score`."""
        if self._keys is None:
            raise ValueError("this memory bank keeps no retrieval keys")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        n = len(self._ids)
        scores = queries.float() @ self._keys[:n].float().T
        top = torch.topk(scores, min(k, n), dim=1)
        return [
            [self._ids[i] for i, score in zip(row, row_scores) if score >= min_score]
            for row, row_scores in zip(top.indices.tolist(), top.values.tolist())
        ]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        name = f"modulations-v{self.version}.safetensors"
        tmp = out / f".{name}.tmp"
        tensors = {"modulations": self.tensor().contiguous()}
        if self._keys is not None:
            tensors["keys"] = self._keys[: len(self._ids)].contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, out / name)
        index = {
            "version": self.version,
            "num_tokens": self.num_tokens,
            "width": self.width,
            "key_width": self.key_width,
            "networks": self.networks,
            "dtype": str(STORAGE_DTYPE).removeprefix("torch."),
            "file": name,
            "ids": self._ids,
        }
        tmp_index = out / f".{INDEX}.tmp"
        tmp_index.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp_index, out / INDEX)
        for stale in out.glob("modulations-v*.safetensors"):
            if stale.name != name:
                stale.unlink()
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> MemoryBank:
        src = Path(directory)
        if not (src / INDEX).exists():
            raise FileNotFoundError(f"no memory bank at {src} (missing {INDEX})")
        index = json.loads((src / INDEX).read_text(encoding="utf-8"))
        tensors = load_file(str(src / index["file"]))
        data = tensors["modulations"].to(STORAGE_DTYPE)
        keys = tensors.get("keys")
        ids: Sequence[str] = index["ids"]
        if data.shape != (len(ids), index["num_tokens"], index["width"]) or (
            keys is not None and keys.shape[0] != len(ids)
        ):
            raise ValueError(
                f"memory bank at {src} is inconsistent: {len(ids)} ids, tensor {tuple(data.shape)}"
            )
        bank = cls(index["num_tokens"], index["width"], index.get("networks"))
        bank._data = data.clone()
        bank._keys = None if keys is None else keys.to(STORAGE_DTYPE).clone()
        bank._ids = list(ids)
        bank._row = {doc_id: i for i, doc_id in enumerate(ids)}
        bank.version = int(index["version"])
        return bank


def _grown(table: torch.Tensor, rows: int) -> torch.Tensor:
    """`table` copied into a larger buffer of `rows` rows (the rest uninitialised)."""
    grown = table.new_empty((rows, *table.shape[1:]))
    grown[: table.shape[0]] = table
    return grown
