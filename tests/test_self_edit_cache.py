"""Self-edits the base writes are cached by a hash of all that decides them: a re-run reads them
back without generating, and a change of prompt, k, token cap or base writes anew."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adaptation.data import Document
from adaptation.learner import Learner, LearnSettings, SelfEditWriting
from adaptation.modeling import LoraSettings, attach_lora, load_base
from adaptation.self_edit_cache import SelfEditCache, model_identity
from adaptation.updater import UpdateConfig
from adaptation.weighting import UniformWeighter

DOC = Document("d1", "Alda Venn was born in Marrow Bay in 1961.", title="Alda Venn")


class CountingGenerate:
    """Wraps a model's `generate` and counts the calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.inner = model.generate
        model.generate = self  # type: ignore[method-assign]

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args, **kwargs)


def _learner(model_dir: Path) -> tuple[Learner, CountingGenerate]:
    model, tok = load_base(model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    learner = Learner(peft, tok, UniformWeighter(), UpdateConfig(), LearnSettings())
    return learner, CountingGenerate(model)


def test_a_second_write_reads_the_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    learner, generate = _learner(tiny_model_dir)
    write = SelfEditWriting(k=2, max_new_tokens=12, cache_dir=tmp_path)
    first = learner.written_self_edits(DOC, write)
    assert generate.calls == 1 and len(first) == 2
    assert len(list(tmp_path.rglob("*.json"))) == 1
    assert learner.written_self_edits(DOC, write) == first and generate.calls == 1
    # seeded from the document's id: writing anew without the cache writes the same
    assert learner.written_self_edits(DOC, replace(write, cache_dir=None)) == first
    assert generate.calls == 2
    # a fresh learner (a replay in another process) reads them back too
    again, fresh_generate = _learner(tiny_model_dir)
    assert again.written_self_edits(DOC, write) == first and fresh_generate.calls == 0


@pytest.mark.parametrize(
    "change",
    [{"prompt": "rewrite"}, {"k": 3}, {"max_new_tokens": 13}],
    ids=["prompt", "k", "tokens"],
)
def test_the_key_changes_with_what_decides_the_writing(
    tiny_model_dir: Path, tmp_path: Path, change: dict[str, object]
) -> None:
    learner, generate = _learner(tiny_model_dir)
    write = SelfEditWriting(k=2, max_new_tokens=12, cache_dir=tmp_path)
    learner.written_self_edits(DOC, write)
    learner.written_self_edits(DOC, replace(write, **change))  # type: ignore[arg-type]
    assert generate.calls == 2 and len(list(tmp_path.rglob("*.json"))) == 2
    learner.written_self_edits(replace(DOC, text=DOC.text + " She writes."), write)
    assert generate.calls == 3, "another text is another entry"


def test_another_base_is_another_key(tiny_model_dir: Path) -> None:
    model, _ = load_base(tiny_model_dir, device="cpu")
    same, _ = load_base(tiny_model_dir, device="cpu")
    assert model_identity(model) == model_identity(same)
    assert model_identity(attach_lora(same, LoraSettings(rank=4))) == model_identity(model)
    with torch.no_grad():  # the same directory, rebuilt with other weights
        model.get_input_embeddings().weight[0] += 1
    assert model_identity(model) != model_identity(same)


def test_an_unreadable_entry_is_written_again(tmp_path: Path) -> None:
    cache = SelfEditCache(tmp_path)
    key = cache.key(a=1)
    assert cache.key(a=1) == key != cache.key(a=2)
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_text("{not json")
    assert cache.get_or_write({"a": 1}, lambda: ["x"]) == ["x"]
    assert cache.get_or_write({"a": 1}, lambda: ["y"]) == ["x"]
