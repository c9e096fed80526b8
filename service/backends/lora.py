"""Modes lora and seal: each namespace trains its own LoRA adapter on one shared base model, as a
thin wrapper over the learning core's `Learner`, which `uptake eval` learns through too; seal
also has the base write self-edits for documents sent without any. A snapshot holds the adapter,
the optimizer state and, with rehearsal on, the learner's memory of the documents it learned."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel

from adaptation.answering import SCORED_ANSWER_TOKENS, generate_answers
from adaptation.best_of_k import learn_written_best_of
from adaptation.data import Document
from adaptation.learner import (
    IngestResult,
    Learner,
    LearnSettings,
    SelfEditWriting,
    fresh_adapter,
)
from adaptation.modeling import RNG_LOCK, adapter_state, load_base, save_adapter_state
from adaptation.weighting import make_weighter
from adaptation.weighting.base import Weighter
from service.settings import Settings

OPTIMIZER_FILE = "optimizer.pt"
# The rehearsal memory: the documents the lineage learned last, so a restored version (a
# restart, a rollback, a forget's parent) rehearses exactly what its lineage would have.
REHEARSAL_FILE = "rehearsal.jsonl"
# A fresh adapter always starts from this seed, so a replay from version 0 (forgetting a
# lineage's first document) starts where the lineage did.
LORA_SEED = 0


def learn_settings(settings: Settings) -> LearnSettings:
    """How a namespace learns a document; mode seal also writes self-edits for documents sent
    without any."""
    write = (
        SelfEditWriting(
            settings.self_edit_k,
            settings.self_edit_prompt,
            settings.self_edit_tokens,
            settings.self_edit_cache,
        )
        if settings.mode == "seal"
        else None
    )
    return LearnSettings(
        chunk_chars=settings.chunk_chars,
        max_doc_tokens=settings.max_doc_tokens,
        tag_salt="" if settings.source_tags else None,
        write=write,
        rehearse=settings.rehearse,
        rehearsal_window=settings.rehearsal_window,
        learn_batch=settings.learn_batch,
    )


class LoraModels:
    """One base model shared by every namespace's trainable LoRA adapter."""

    def __init__(self, settings: Settings, weighter: Weighter) -> None:
        self.settings = settings
        self.weighters = {settings.strategy: weighter}
        self.base, self.tokenizer = load_base(
            settings.model, settings.device, settings.torch_dtype()
        )
        self.model: PeftModel | None = None
        self._opened = 0

    def weighter(self, settings: Settings) -> Weighter:
        """The weighter of a namespace's strategy, built once per strategy."""
        if settings.strategy not in self.weighters:
            self.weighters[settings.strategy] = build_weighter(settings)
        return self.weighters[settings.strategy]

    def open(self, namespace: str, snapshot: Path | None, settings: Settings) -> LoraBackend:
        # A new name each time: a namespace's state is replaced by opening the new one first.
        self._opened += 1
        name = f"ns_{namespace}_{self._opened}"
        if snapshot is None:
            self.model = fresh_adapter(
                self.model or self.base, self.settings.lora(), LORA_SEED, name
            )
        elif self.model is None:
            with RNG_LOCK:  # loading initialises at random first (see RNG_LOCK)
                self.model = PeftModel.from_pretrained(
                    self.base, str(snapshot), adapter_name=name, is_trainable=True
                )
        else:
            with RNG_LOCK:
                self.model.load_adapter(str(snapshot), adapter_name=name, is_trainable=True)
        return LoraBackend(self, name, snapshot, settings)


class LoraBackend:
    """One namespace's adapter, learned by the learning core's `Learner`; the optimizer state
    rides in snapshots beside the adapter."""

    def __init__(
        self, models: LoraModels, adapter_name: str, snapshot: Path | None, settings: Settings
    ) -> None:
        assert models.model is not None
        self.models = models
        self.model = models.model
        self.name = adapter_name
        self.best_of = settings.self_edit_best_of if settings.mode == "seal" else 1
        self.model.set_adapter(adapter_name)  # only this adapter's weights are trainable now
        self.learner = Learner(
            self.model,
            models.tokenizer,
            models.weighter(settings),
            settings.update(),
            learn_settings(settings),
        )
        if snapshot is not None:
            updater = self.learner.updater
            state = torch.load(
                snapshot / OPTIMIZER_FILE, map_location=updater.device, weights_only=True
            )
            updater.load_state_dict(state)
            memory = self.learner.memory
            if memory.window and (snapshot / REHEARSAL_FILE).is_file():
                memory.load(snapshot / REHEARSAL_FILE)

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        self.model.set_adapter(self.name)
        return learn_written_best_of(self.learner, doc, self.best_of, trust)

    def ingest_together(self, items: Sequence[tuple[Document, float]]) -> list[IngestResult]:
        """Documents that queued up, stacked where `Learner.learn_together` finds it exact. Mode
        seal learns one by one: its written self-edits make each document its own lesson."""
        if self.learner.settings.write is not None:
            return [self.ingest(doc, trust) for doc, trust in items]
        self.model.set_adapter(self.name)
        return self.learner.learn_together(items)

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        self.model.set_adapter(self.name)
        return generate_answers(
            self.model,
            self.models.tokenizer,
            questions,
            contexts=contexts,
            max_new_tokens=SCORED_ANSWER_TOKENS,
        )

    def memory_bytes(self) -> int:
        return self.learner.memory_bytes()

    def capture_state(self) -> Callable[[Path], None]:
        adapter = adapter_state(self.model, self.name)
        config = self.model.peft_config[self.name]
        optimizer = copy.deepcopy(self.learner.updater.state_dict())
        memory = self.learner.memory.dumps()

        def write(directory: Path) -> None:
            save_adapter_state(adapter, config, directory)
            torch.save(optimizer, directory / OPTIMIZER_FILE)
            if memory:
                (directory / REHEARSAL_FILE).write_text(memory, encoding="utf-8")

        return write

    def write_state(self, directory: Path) -> None:
        self.capture_state()(directory)

    def close(self) -> None:
        self.model.delete_adapter(self.name)


def build_weighter(settings: Settings) -> Weighter:
    """The weighter of the service's strategy (a trained one is loaded from its directory)."""
    return make_weighter(settings.strategy, path=settings.weighter_path())
