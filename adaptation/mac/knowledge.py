"""A memory bank as the learning core's `Knowledge`: a document becomes one entry, a question is
answered through the prefix aggregated over the bank. Mode mac's worker backend and `uptake
eval`'s mac strategies both ingest and answer through it, so what is measured is what is served."""

from __future__ import annotations

from collections.abc import Sequence

from adaptation.answering import SCORED_ANSWER_TOKENS
from adaptation.data import Document
from adaptation.learner import IngestResult
from adaptation.mac.system import MacSystem


class BankKnowledge:
    """Only the text is amortized. Source trust, source tags and self-edits are ignored: there is
    no update to scale (an entry is in the bank or not), and the amortizer was trained on
    documents alone, so self-edits would be entries it was never meant to read."""

    def __init__(self, system: MacSystem, max_new_tokens: int = SCORED_ANSWER_TOKENS) -> None:
        self.system = system
        self.max_new_tokens = max_new_tokens

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        # An id the bank already holds is a no-op that still counts as applied: it is learned.
        self.system.ingest(doc.id, doc.text)
        return IngestResult(applied=True)

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        return self.system.answer(questions, contexts=contexts, max_new_tokens=self.max_new_tokens)

    def memory_bytes(self) -> int:
        return self.system.bank.nbytes

    def drop(self, doc_id: str) -> bool:
        """Forget a document by removing its entry; False if the bank does not hold it. Entries
        do not depend on each other, so nothing needs replaying."""
        return self.system.drop(doc_id)
