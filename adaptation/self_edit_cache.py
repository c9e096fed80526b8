"""Written self-edits kept on disk by a hash of everything that decides them, so a re-run (an
eval repeated, a forget's replay) reads them back instead of sampling them again: on CPU writing
costs far more than training on what is written.

The key covers the base (its name and a fingerprint of its weights), the rendered request (the
prompt's template, the chat template, the title and the passage), the number of samples, the
token cap, the sampling settings and the seed. Each entry is one JSON file, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaptation.paths import uptake_home


def default_cache_dir() -> Path:
    return uptake_home() / "self_edits"


def model_identity(model: torch.nn.Module) -> str:
    """The base that writes: its name or path, its config, and a hash of the first rows of its
    input embedding, so a base rebuilt in the same directory does not reuse its predecessor's
    entries. A PeftModel is identified by its base (self-edits are written with adapters off)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    digest = hashlib.sha256(config.to_json_string().encode() if config is not None else b"")
    embedding = base.get_input_embeddings().weight  # type: ignore[operator]
    digest.update(embedding[:64].detach().float().cpu().numpy().tobytes())
    name = getattr(config, "name_or_path", "") if config is not None else ""
    return f"{name}#{digest.hexdigest()[:16]}"


class SelfEditCache:
    """Generations under `directory`, one file per key."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(**parts: Any) -> str:
        """The sha256 of the parts (JSON values), independent of their order."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def load(self, key: str) -> list[str] | None:
        """The cached generations, or None (also for an unreadable entry, which is rewritten)."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        gens = entry.get("generations") if isinstance(entry, dict) else None
        return [str(g) for g in gens] if isinstance(gens, list) else None

    def store(self, key: str, generations: list[str], **about: Any) -> None:
        """Write the entry beside a temporary file and rename it in, so a reader never sees half
        of one; `about` (the prompt's name, the document's title) is kept for people reading."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**about, "generations": generations}, ensure_ascii=False))
        os.replace(tmp, path)

    def get_or_write(
        self, parts: dict[str, Any], write: Callable[[], list[str]], **about: Any
    ) -> list[str]:
        """The generations cached under `parts`, else those `write` returns, stored."""
        key = self.key(**parts)
        cached = self.load(key)
        if cached is not None:
            return cached
        generations = write()
        self.store(key, generations, **about)
        return generations
