"""The memory bank: one fp16 T x d modulation per document, appended at ingest.

Entries are never edited: a document is appended once (a repeat of its id is a no-op) and can
only be dropped, for forgetting. Every change bumps the version, so readers can tell when the
memory they aggregated over is stale.

On disk a bank is a directory: the tensors in a safetensors file named by version, and
index.json naming that file, the ids in row order and the version. The index is replaced last
and atomically, so a crash mid-save leaves the previous bank loadable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "index.json"
STORAGE_DTYPE = torch.float16


class MemoryBank:
    def __init__(self, num_tokens: int, width: int) -> None:
        self.num_tokens = num_tokens
        self.width = width
        self.version = 0
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._data = torch.empty((0, num_tokens, width), dtype=STORAGE_DTYPE)

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
    def entry_nbytes(self) -> int:
        return self.num_tokens * self.width * STORAGE_DTYPE.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_entries * self.entry_nbytes

    def append(self, doc_id: str, modulation: torch.Tensor) -> bool:
        """Store a document's T x d modulation; False (and no change) if the id is already held."""
        if modulation.shape != (self.num_tokens, self.width):
            raise ValueError(
                f"modulation of shape {tuple(modulation.shape)}; this bank holds "
                f"{self.num_tokens} x {self.width}"
            )
        if doc_id in self._row:
            return False
        n = len(self._ids)
        if n == self._data.shape[0]:  # grow geometrically: appends stay amortised O(1)
            grown = torch.empty((max(16, 2 * n), self.num_tokens, self.width), dtype=STORAGE_DTYPE)
            grown[:n] = self._data[:n]
            self._data = grown
        self._data[n] = modulation.detach().to("cpu", STORAGE_DTYPE)
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

    def save(self, directory: str | os.PathLike[str]) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        name = f"modulations-v{self.version}.safetensors"
        tmp = out / f".{name}.tmp"
        save_file({"modulations": self.tensor().contiguous()}, str(tmp))
        os.replace(tmp, out / name)
        index = {
            "version": self.version,
            "num_tokens": self.num_tokens,
            "width": self.width,
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
        data = load_file(str(src / index["file"]))["modulations"].to(STORAGE_DTYPE)
        ids: Sequence[str] = index["ids"]
        if data.shape != (len(ids), index["num_tokens"], index["width"]):
            raise ValueError(
                f"memory bank at {src} is inconsistent: {len(ids)} ids, tensor {tuple(data.shape)}"
            )
        bank = cls(index["num_tokens"], index["width"])
        bank._data = data.clone()
        bank._ids = list(ids)
        bank._row = {doc_id: i for i, doc_id in enumerate(ids)}
        bank.version = int(index["version"])
        return bank
