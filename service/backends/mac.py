"""Mode mac: each document becomes an entry in its namespace's MAC memory bank, and questions are
answered by the frozen base reading a prefix aggregated over that bank (adaptation/mac).

The trained networks (UPTAKE_MAC_DIR, from `uptake meta-train mac`) are loaded once per process
and shared by every namespace; only the banks are per namespace. In the worker, ingesting is one
amortizer forward pass with no gradient, and a snapshot holds the namespace's bank (`bank/`), so
snapshots, manifests, checksums, recovery and the lineage work as in mode lora. The serving engine
(service/engine.py, `MacServingEngine`) loads each namespace's published bank through `MacModels`
and answers from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.answering import SCORED_ANSWER_TOKENS
from adaptation.data import Document
from adaptation.learner import IngestResult
from adaptation.mac.bank import MemoryBank
from adaptation.mac.system import BANK, MacSystem
from adaptation.modeling import load_base
from service.settings import Settings


class MacModels:
    """The frozen base and the trained networks, shared by every namespace's bank. In the worker
    it is the `BackendFactory` of mode mac."""

    def __init__(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path
    ) -> None:
        trained = MacSystem.load(directory, base, tokenizer)
        self.base = base
        self.tokenizer = tokenizer
        self.networks = trained.networks
        self.encoder_tokenizer = trained.encoder_tokenizer

    @classmethod
    def load(cls, settings: Settings) -> MacModels:
        """Check UPTAKE_MAC_DIR before the slow part, then load the base and the networks."""
        directory = settings.mac_networks()
        base, tokenizer = load_base(settings.model, settings.device)
        base.requires_grad_(False)
        return cls(base, tokenizer, directory)

    def system(self, snapshot: Path | None) -> MacSystem:
        """The shared networks over the bank saved in `snapshot` (None: an empty bank)."""
        bank = MemoryBank.load(snapshot / BANK) if snapshot is not None else None
        return MacSystem(self.networks, self.base, self.tokenizer, self.encoder_tokenizer, bank)

    def open(self, namespace: str, snapshot: Path | None, settings: Settings) -> MacBackend:
        return MacBackend(self.system(snapshot))


class MacBackend:
    """One namespace's bank in the worker: a document is appended, a snapshot saves the bank.

    Only the text is amortized. Source trust, source tags and self-edits are ignored: there is no
    update to scale (an entry is in the bank or not; a distrusted source's documents belong in
    another namespace, or forgotten), and the amortizer was trained on documents alone, so
    self-edits would be entries it was never meant to read."""

    def __init__(self, system: MacSystem) -> None:
        self.system = system

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        # An id the bank already holds is a no-op that still counts as applied: it is learned.
        self.system.ingest(doc.id, doc.text)
        return IngestResult(applied=True)

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        return self.system.answer(questions, contexts=contexts, max_new_tokens=SCORED_ANSWER_TOKENS)

    def memory_bytes(self) -> int:
        return self.system.bank.nbytes

    def drop(self, doc_id: str) -> bool:
        """Forget a document by removing its entry; False if the bank does not hold it. Entries
        do not depend on each other, so nothing needs replaying."""
        return self.system.drop(doc_id)

    def write_state(self, directory: Path) -> None:
        self.system.save_bank(directory)

    def close(self) -> None:
        """Nothing to free: the bank goes with this object; the networks stay shared."""
