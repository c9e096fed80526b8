"""Mode mac: each document becomes an entry in its namespace's MAC memory bank, and questions are
answered by the frozen base reading a prefix aggregated over that bank (adaptation/mac).

The trained networks (UPTAKE_MAC_DIR, from `uptake meta-train mac`) are loaded once per process
and shared by every namespace; only the banks are per namespace. In the worker, ingesting is one
amortizer forward pass with no gradient, and a snapshot holds the namespace's bank (`bank/`), so
snapshots, manifests, checksums, recovery and the lineage work as in mode lora. The serving engine
(service/engine.py, `MacServingEngine`) loads each namespace's published bank through `MacModels`
and answers from it.

Every entry also keeps its document's MiniLM embedding (adaptation/retrieval.py), so that with
UPTAKE_MAC_TOP_K each question aggregates only its k nearest entries (mac+rag); the keys live in
the bank, so they follow it through snapshots, restarts, forgets and replays, and the setting can
change without ingesting again. A bank written by other networks is refused: at start
(`check_banks`), and by `MacSystem` whenever one is opened.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.mac.bank import BankIndex, MemoryBank
from adaptation.mac.knowledge import BankKnowledge
from adaptation.mac.networks import MacConfig
from adaptation.mac.system import (
    BANK,
    CONFIG,
    BankMismatch,
    MacSystem,
    check_bank,
    networks_identity,
)
from adaptation.modeling import load_base
from service.adapters import AdapterStore
from service.settings import ConfigError, Settings


def embed(texts: Sequence[str]) -> torch.Tensor:
    """Retrieval keys (adaptation/retrieval.py), imported on first use: that module marks the
    process offline for the hub, which only a process that embeds should inherit."""
    from adaptation.retrieval import embed as minilm

    return minilm(texts)


def check_banks(settings: Settings) -> None:
    """Before anything loads: every namespace's newest bank must belong to the networks in
    UPTAKE_MAC_DIR (same entry shape, written by the same trained networks)."""
    directory = settings.mac_networks()
    config = MacConfig.from_json(json.loads((directory / CONFIG).read_text(encoding="utf-8")))
    identity = networks_identity(directory)
    store = AdapterStore(settings.adapters_dir())
    for namespace in store.namespaces():
        version = store.latest(namespace)
        bank = store.path(namespace, version) / BANK
        if not version or not bank.is_dir():
            continue
        index = BankIndex.read(bank)
        try:
            check_bank((index.num_tokens, index.width), index.networks, config, identity)
        except BankMismatch as exc:
            raise ConfigError(
                f"namespace {namespace!r} (snapshot v{version:06d} in {settings.adapters_dir()}): "
                f"{exc}; point UPTAKE_MAC_DIR at the networks that wrote it, or start on another "
                "UPTAKE_STORE_DIR"
            ) from None


class MacModels:
    """The frozen base and the trained networks, shared by every namespace's bank. In the worker
    it is the `BackendFactory` of mode mac."""

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        directory: Path,
        top_k: int = 0,
        min_similarity: float = -1.0,
    ) -> None:
        trained = MacSystem.load(directory, base, tokenizer)
        self.base = base
        self.tokenizer = tokenizer
        self.networks = trained.networks
        self.networks_id = trained.networks_id
        self.encoder_tokenizer = trained.encoder_tokenizer
        self.top_k = top_k
        self.min_similarity = min_similarity

    @classmethod
    def load(cls, settings: Settings) -> MacModels:
        """Check UPTAKE_MAC_DIR before the slow part, then load the base and the networks."""
        directory = settings.mac_networks()
        base, tokenizer = load_base(
            settings.model, settings.device, settings.torch_dtype(serving=True)
        )
        base.requires_grad_(False)
        return cls(base, tokenizer, directory, settings.mac_top_k, settings.mac_min_similarity)

    def system(self, snapshot: Path | None) -> MacSystem:
        """The shared networks over the bank saved in `snapshot` (None: an empty bank); a bank
        of other networks raises `BankMismatch`."""
        bank = MemoryBank.load(snapshot / BANK) if snapshot is not None else None
        return MacSystem(
            self.networks,
            self.base,
            self.tokenizer,
            self.encoder_tokenizer,
            bank,
            self.networks_id,
            embed,
            self.top_k,
            self.min_similarity,
        )

    def open(self, namespace: str, snapshot: Path | None, settings: Settings) -> MacBackend:
        return MacBackend(self.system(snapshot))


class MacBackend(BankKnowledge):
    """One namespace's bank in the worker: a document is appended, a snapshot saves the bank. A
    distrusted source's documents belong in another namespace, or forgotten."""

    def write_state(self, directory: Path) -> None:
        self.system.save_bank(directory)

    def capture_state(self) -> Callable[[Path], None]:
        bank = copy.deepcopy(self.system.bank)

        def write(directory: Path) -> None:
            bank.save(directory / BANK)

        return write

    def close(self) -> None:
        """Nothing to free: the bank goes with this object; the networks stay shared."""
