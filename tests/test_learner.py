"""The one learner: the worker's LoRA backend and `uptake eval`'s gradient strategies learn a
document through the same code, from the same seeded adapter, to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptation.data import Document
from adaptation.lab.evaluation import EvalConfig, make_method
from adaptation.learner import LearnSettings, split_text
from adaptation.modeling import LoraSettings, lora_parameters
from adaptation.weighting import make_weighter
from service.backends.lora import LORA_SEED, LoraModels
from service.cli import build_parser
from service.settings import Settings
from tests.servicekit import make_settings

TITLE = "Alda Venn"
TEXT = " ".join(
    f"Alda Venn was born in Marrow Bay in {1900 + i} and works for Quillon Works as an engineer."
    for i in range(9)
)  # about 800 characters: three chunks of at most 300
EDITS = (
    "1. Alda Venn is an engineer.\n2. Quillon Works employs Alda Venn.",
    " ".join(f"Marrow Bay is where Alda Venn was born, say record {i}." for i in range(8)),
)


def _weights(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors, named as if the adapter were called 'default'."""
    return {
        name.replace(f".{adapter}.", ".default."): p.detach().clone()
        for name, p in lora_parameters(model).items()
    }


@pytest.mark.parametrize(("strategy", "self_edits"), [("uniform", ()), ("seal", EDITS)])
def test_the_worker_and_the_eval_learn_a_document_to_identical_weights(
    tmp_path: Path, tiny_model_dir: Path, strategy: str, self_edits: tuple[str, ...]
) -> None:
    doc = Document("d1", TEXT, source="wire", title=TITLE, self_edits=self_edits)
    settings = make_settings(tiny_model_dir, tmp_path, "redis://unused", "p", chunk_chars=300)
    backend = LoraModels(settings, make_weighter("uniform")).open("ns", None, settings)
    worker_start = _weights(backend.model, backend.name)
    by_worker = backend.ingest(doc, 0.5)

    cfg = EvalConfig(
        lora=LoraSettings(rank=settings.lora_rank, alpha=settings.lora_alpha),
        learning=LearnSettings(chunk_chars=300, max_doc_tokens=settings.max_doc_tokens),
        device="cpu",
    )
    method = make_method(strategy, str(tiny_model_dir), cfg, settings.lr, LORA_SEED, [TEXT])
    eval_start = _weights(method.model, "default")
    by_eval = method.ingest(doc, 0.5)

    assert by_worker == by_eval
    # Three chunks of text, then two list items and the long edit split in two.
    assert (by_worker.sequences, by_worker.self_edit_sequences) == (
        (7, 4) if self_edits else (3, 0)
    )
    worker_end, eval_end = _weights(backend.model, backend.name), _weights(method.model, "default")
    assert sorted(worker_end) == sorted(eval_end) and worker_end
    assert all(torch.equal(worker_start[n], eval_start[n]) for n in worker_start), "same seed"
    assert all(torch.equal(worker_end[n], eval_end[n]) for n in worker_end)
    assert not all(torch.equal(worker_start[n], worker_end[n]) for n in worker_end), "it learned"


def test_the_eval_trains_the_services_adapter_by_default() -> None:
    """The eval's LoRA shape and document handling default to the service's settings, on the
    command line too."""
    fields = Settings.model_fields
    lora, learning = EvalConfig().lora, EvalConfig().learning
    assert (lora.rank, lora.alpha) == (fields["lora_rank"].default, fields["lora_alpha"].default)
    assert lora.target_modules == fields["lora_targets"].default
    assert learning.chunk_chars == fields["chunk_chars"].default
    assert learning.max_doc_tokens == fields["max_doc_tokens"].default
    args = build_parser().parse_args(["eval", "--data", "d.jsonl", "--out", "o"])
    assert (args.lora_rank, args.lora_alpha, args.epochs) == (lora.rank, lora.alpha, 1)


def test_split_text_keeps_every_word() -> None:
    text = " ".join(f"word{i}" for i in range(500))
    chunks = split_text(text, 300)
    assert all(len(c) <= 300 for c in chunks)
    assert " ".join(c.strip() for c in chunks).split() == text.split()
    assert split_text("short", 300) == ["short"]
    assert split_text("   ", 300) == []
