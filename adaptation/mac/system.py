"""A MAC system: trained networks + a memory bank + the frozen base they modulate.

Ingesting a document is one forward pass of the amortizer with no gradient; answering aggregates
the bank (or only the given documents' entries, for mac+rag) into a prefix for the base. With an
`embed` function every entry also gets a retrieval key, and with `top_k` each question then
aggregates only the k entries whose keys are nearest its own embedding (mac+rag in the service);
with `min_similarity`, only entries at least that similar to it (none: the plain base answers).

On disk (`save`/`load`): mac_config.json, networks.safetensors, the encoder's tokenizer (the
base's by default, but any works) in encoder_tokenizer/, and the bank in bank/. The networks'
identity is a hash of the first two files; a bank records the identity of the networks that
wrote it, and other networks refuse it (`BankMismatch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adaptation.mac.amortizer import tokenize
from adaptation.mac.bank import MemoryBank
from adaptation.mac.injection import (
    PrefixKV,
    PrefixShape,
    continue_with_prefix,
    generate_with_prefix,
)
from adaptation.mac.networks import MacConfig, MacNetworks

CONFIG = "mac_config.json"
NETWORKS = "networks.safetensors"
ENCODER_TOKENIZER = "encoder_tokenizer"
BANK = "bank"

log = logging.getLogger(__name__)

# Texts -> unit retrieval keys [N, e] (adaptation.retrieval.embed).
Embed = Callable[[Sequence[str]], torch.Tensor]


class BankMismatch(ValueError):
    """A memory bank written by other networks than the ones asked to read it."""


def networks_identity(directory: str | os.PathLike[str]) -> str:
    """A short hash of the trained networks' config and weights, as saved in `directory`:
    retrained networks, even of the same shape, read a bank differently."""
    digest = hashlib.sha256()
    for name in (CONFIG, NETWORKS):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()[:16]


def check_bank(
    entries: tuple[int, int], written_by: str | None, cfg: MacConfig, networks_id: str | None
) -> None:
    """Refuse a bank whose (T, d) entries or recorded networks are not these networks'. A bank
    that records no networks (or networks that record no identity) is judged by shape alone."""
    if entries != (cfg.num_tokens, cfg.width):
        raise BankMismatch(
            f"the memory bank holds {entries[0]} x {entries[1]} entries but these MAC networks "
            f"write {cfg.num_tokens} x {cfg.width}"
        )
    if written_by and networks_id and written_by != networks_id:
        raise BankMismatch(
            f"the memory bank was written by MAC networks {written_by}, not by these "
            f"({networks_id})"
        )


class MacSystem:
    def __init__(
        self,
        networks: MacNetworks,
        base_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        encoder_tokenizer: PreTrainedTokenizerBase | None = None,
        bank: MemoryBank | None = None,
        networks_id: str | None = None,
        embed: Embed | None = None,
        top_k: int = 0,
        min_similarity: float = -1.0,
    ) -> None:
        cfg = networks.config
        shape = PrefixShape.of(base_model)
        if shape != cfg.prefix:
            raise ValueError(
                f"these MAC networks were trained for a base shaped {cfg.prefix}, not {shape}; "
                "train them for this base with `uptake meta-train mac`"
            )
        if (top_k or min_similarity > -1.0) and embed is None:
            raise ValueError("retrieving entries by similarity needs an embed function")
        self.base = base_model
        self.tokenizer = tokenizer
        # An encoder reading with the base reads the base's own tokens.
        self.encoder_tokenizer = (
            tokenizer if networks.reads_base else (encoder_tokenizer or tokenizer)
        )
        self.networks_id = networks_id
        self.embed = embed
        self.top_k = top_k
        self.min_similarity = min_similarity
        if len(self.encoder_tokenizer) > cfg.amortizer.vocab_size:
            raise ValueError(
                f"the encoder tokenizer has {len(self.encoder_tokenizer)} tokens but the encoder "
                f"embeds {cfg.amortizer.vocab_size}"
            )
        self.device = next(base_model.parameters()).device
        self.networks = networks.to(self.device).eval()
        self.networks.bind(base_model)
        self.bank = bank if bank is not None else MemoryBank(cfg.num_tokens, cfg.width)
        check_bank((self.bank.num_tokens, self.bank.width), self.bank.networks, cfg, networks_id)
        self.bank.networks = self.bank.networks or networks_id
        self._unkeyed_warned = False

    @classmethod
    def create(
        cls,
        base_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: MacConfig | None = None,
    ) -> MacSystem:
        """Untrained networks sized for the base, for tests and for trying the plumbing before
        training (`uptake meta-train mac` builds its networks from its own config)."""
        config = config or MacConfig.for_base(base_model)
        return cls(MacNetworks(config), base_model, tokenizer)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        base_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> MacSystem:
        src = Path(directory)
        if not (src / CONFIG).exists():
            raise FileNotFoundError(
                f"no MAC system at {src} (missing {CONFIG}); build one with `uptake meta-train mac`"
            )
        config = MacConfig.from_json(json.loads((src / CONFIG).read_text(encoding="utf-8")))
        networks = MacNetworks(config)
        networks.load_state_dict(load_file(str(src / NETWORKS)))
        encoder_tok = (
            AutoTokenizer.from_pretrained(str(src / ENCODER_TOKENIZER))
            if (src / ENCODER_TOKENIZER).is_dir()
            else None
        )
        bank = MemoryBank.load(src / BANK) if (src / BANK).is_dir() else None
        return cls(networks, base_model, tokenizer, encoder_tok, bank, networks_identity(src))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(json.dumps(self.networks.config.to_json(), indent=2), "utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.networks.state_dict().items()}
        save_file(state, str(out / NETWORKS))
        self.encoder_tokenizer.save_pretrained(str(out / ENCODER_TOKENIZER))
        self.save_bank(out)
        return out

    def save_bank(self, directory: str | os.PathLike[str]) -> Path:
        """Only the bank: what changes at ingest, cheap to write after every document."""
        return self.bank.save(Path(directory) / BANK)

    @torch.no_grad()
    def modulate(self, texts: Sequence[str]) -> torch.Tensor:
        """Documents -> modulations [N, T, d], one forward pass, no gradient."""
        ids, mask = tokenize(
            self.encoder_tokenizer, texts, self.networks.config.amortizer.max_length, self.device
        )
        return self.networks.modulate(ids, mask)

    def ingest(self, doc_id: str, text: str) -> bool:
        """Amortize a document into the bank; False if the bank already holds its id."""
        return self.ingest_many([(doc_id, text)]) == 1

    def ingest_many(self, docs: Sequence[tuple[str, str]], batch_size: int = 16) -> int:
        """(doc_id, text) pairs, amortized (and keyed, with `embed`) in batches; returns how
        many were new. A bank saved without keys stays without them."""
        new = [(i, t) for i, t in dict(docs).items() if i not in self.bank]
        added = 0
        for start in range(0, len(new), batch_size):
            chunk = new[start : start + batch_size]
            texts = [t for _, t in chunk]
            keyed = self.embed is not None and (self.bank.keyed or not len(self.bank))
            keys = self.embed(texts) if keyed and self.embed is not None else [None] * len(chunk)
            for (doc_id, _), modulation, key in zip(chunk, self.modulate(texts), keys):
                added += self.bank.append(doc_id, modulation, key)
        return added

    def drop(self, doc_id: str) -> bool:
        return self.bank.drop(doc_id)

    @torch.no_grad()
    def prefix(
        self, questions: Sequence[str], doc_ids: Sequence[Sequence[str]] | None = None
    ) -> PrefixKV | None:
        """The prefix for each question: over its own `doc_ids` only, else over its `top_k`
        retrieved entries, else over the whole bank. None when no question has any memory (the
        plain base answers)."""
        if doc_ids is None:
            doc_ids = self.retrieve(questions)
        if doc_ids is None:
            if not len(self.bank):
                return None
            memory, mask = self.bank.tensor()[None], None
        else:
            rows = [self.bank.select(ids) for ids in doc_ids]
            if not any(len(r) for r in rows):
                return None
            memory, mask = _pad_entries(rows)
            mask = mask.to(self.device)
        cfg = self.networks.config.question
        q_ids, q_mask = tokenize(self.encoder_tokenizer, questions, cfg.max_length, self.device)
        return self.networks.prefix(q_ids, q_mask, memory.to(self.device, torch.float32), mask)

    def retrieve(self, questions: Sequence[str]) -> list[list[str]] | None:
        """Each question's `top_k` nearest entries (all, without top_k) of those at least
        `min_similarity` to it; None to read the whole bank (neither is set, or a bank saved
        without keys, which is said once). The similarity floor is a gate: a question about
        nothing in the bank reads no memory, and the base answers it as it would alone."""
        gated = self.min_similarity > -1.0
        if not (self.top_k or gated) or not len(self.bank) or self.embed is None:
            return None
        if not self.bank.keyed:
            if not self._unkeyed_warned:
                log.warning("mac: this bank keeps no retrieval keys; answering from all of it")
                self._unkeyed_warned = True
            return None
        return self.bank.search(
            self.embed(questions), self.top_k or len(self.bank), self.min_similarity
        )

    def answer(
        self,
        questions: Sequence[str],
        contexts: Sequence[str | None] | None = None,
        doc_ids: Sequence[Sequence[str]] | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> list[str]:
        """Greedy answers. `contexts` go into the prompt (retrieval); `doc_ids` restrict each
        question's memory to those documents (mac+rag); unknown ids are skipped."""
        for name, extra in (("contexts", contexts), ("doc_ids", doc_ids)):
            if extra is not None and len(extra) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(extra)} {name}")
        out: list[str] = []
        for start in range(0, len(questions), batch_size):
            span = slice(start, start + batch_size)
            qs = list(questions[span])
            prefix = self.prefix(qs, None if doc_ids is None else doc_ids[span])
            out.extend(
                generate_with_prefix(
                    self.base,
                    self.tokenizer,
                    prefix,
                    qs,
                    None if contexts is None else contexts[span],
                    max_new_tokens,
                )
            )
        return out

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy continuations of raw prompts (to the end of the line), each prompt aggregating
        the whole bank as if it were the question."""
        prefix = self.prefix(prompts)
        return continue_with_prefix(self.base, self.tokenizer, prefix, prompts, max_new_tokens)


def _pad_entries(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-question entry lists -> memory [B, N_max, T, d] and entry mask [B, N_max]."""
    n = max(1, max(len(r) for r in rows))
    _, t, d = rows[0].shape
    memory = rows[0].new_zeros(len(rows), n, t, d)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        memory[i, : len(r)] = r
        mask[i, : len(r)] = True
    return memory, mask
