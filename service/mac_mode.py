"""Mode mac: each document becomes an entry in its namespace's MAC memory bank, and questions are
answered by the frozen base reading a prefix aggregated over that bank (adaptation/mac).

The trained networks (UPTAKE_MAC_DIR, from `uptake meta-train mac`) are loaded once per process
and shared by every namespace; only the banks are per namespace. In the worker, ingesting is one
amortizer forward pass with no gradient, and a snapshot holds the namespace's bank (`bank/`), so
snapshots, manifests, checksums, recovery and the lineage work as in mode lora. The serving engine
loads each namespace's published bank and answers from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.answering import SCORED_ANSWER_TOKENS
from adaptation.data import Document
from adaptation.learner import IngestResult
from adaptation.mac.bank import MemoryBank
from adaptation.mac.system import BANK, MacSystem
from adaptation.modeling import load_base
from adaptation.prompts import Message, last_question
from service.engine import ServingEngine
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


class MacServingEngine(ServingEngine):
    """The serving engine of mode mac: each namespace answers from its published bank, with no
    adapter. A micro-batch is answered with one generate call per namespace in it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mac: MacModels | None = None
        self._empty: MacSystem | None = None  # namespaces with nothing published: the bare base
        self._banks: dict[str, tuple[int, MacSystem]] = {}  # namespace -> (version, system)

    @property
    def ready(self) -> bool:
        return self._mac is not None

    def load(self) -> None:
        directory = self.settings.mac_networks()
        super().load()
        assert self._base is not None and self._tokenizer is not None
        mac = MacModels(self._base, self._tokenizer, directory)
        self._empty = mac.system(None)
        self._mac = mac

    def version(self, namespace: str) -> int:
        return self._banks.get(namespace, (0, None))[0]

    def versions(self) -> dict[str, int]:
        return {ns: version for ns, (version, _) in self._banks.items()}

    def _install(self, namespace: str, version: int, path: Path | None) -> None:
        assert self._mac is not None
        system = self._mac.system(path)  # read the bank before taking the lock answers hold
        with self._lock:
            self._banks[namespace] = (version, system)

    def _served(self, namespace: str) -> tuple[int, MacSystem]:
        assert self._empty is not None
        return self._banks.get(namespace) or (0, self._empty)

    def _answer_batch(self, asks: list[tuple[str, str]], budget: int) -> list[tuple[str, int]]:
        if self.on_batch is not None:
            self.on_batch(len(asks))
        rows: dict[str, list[int]] = {}
        for i, (namespace, _) in enumerate(asks):
            rows.setdefault(namespace, []).append(i)
        out: list[tuple[str, int]] = [("", 0)] * len(asks)
        with self._lock:
            for namespace, indices in rows.items():
                version, system = self._served(namespace)
                questions = [asks[i][1] for i in indices]
                texts = system.answer(questions, max_new_tokens=budget, batch_size=len(questions))
                for i, text in zip(indices, texts, strict=True):
                    out[i] = (text, version)
        return out

    def chat(self, messages: list[Message], namespace: str, max_new_tokens: int) -> tuple[str, int]:
        """The bank is read with a question: the last user message is asked."""
        return self.answer(last_question(messages), namespace, max_new_tokens)

    def complete(self, prompt: str, namespace: str, max_new_tokens: int) -> tuple[str, int]:
        budget = self._fit_context(prompt, max_new_tokens, "prompt")
        with self._lock:
            version, system = self._served(namespace)
            (text,) = system.complete([prompt], budget)
        return text, version
