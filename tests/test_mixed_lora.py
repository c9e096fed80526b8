"""Adapters by row answer a mixed batch exactly as peft's row routing does, on tiny bases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adaptation.answering import generate_answers
from adaptation.mixed_lora import adapters_by_row, runs, sliceable
from adaptation.modeling import load_base

QUESTIONS = ["Where was Alda Venn born?", "Who won?", "When was it?", "Why?", "What is it?"]
NAMES = ["ada", "", "bea", "ada", "cy"]


def _three_adapters(model_dir: Path, **extra: object) -> PeftModel:
    """Adapters ada, bea and cy with random (non-zero) B, cy on fewer layers than the others."""
    torch.manual_seed(0)
    base, _ = load_base(model_dir, device="cpu")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra)
    model = get_peft_model(base, config, adapter_name="ada")
    model.add_adapter("bea", LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, **extra))
    narrow = dict(extra, target_modules=["q_proj"]) if "target_modules" in extra else extra
    model.add_adapter("cy", LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, **narrow))
    return model.eval()


@pytest.fixture
def three(tiny_model_dir: Path) -> PeftModel:
    return _three_adapters(tiny_model_dir, target_modules=["q_proj", "v_proj", "o_proj"])


def test_adapters_by_row_give_peft_routings_logits(three: PeftModel, tiny_model_dir: Path) -> None:
    _, tok = load_base(tiny_model_dir, device="cpu")
    enc = tok(QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad():
        routed = three(**enc, adapter_names=[n or "__base__" for n in NAMES]).logits
        with adapters_by_row(three, NAMES) as model:
            by_row = model(**enc).logits
        with three.disable_adapter():
            plain = three(**enc).logits
        after = three(**enc).logits
    torch.testing.assert_close(by_row, routed, atol=1e-5, rtol=1e-4)
    # The adapters really differ, and the base row is the plain base...
    assert not torch.allclose(routed[0], plain[0], atol=1e-3)
    assert not torch.allclose(routed[2], plain[2], atol=1e-3)
    torch.testing.assert_close(by_row[1], plain[1], atol=1e-5, rtol=1e-4)
    # ...and the model is itself again afterwards: its active adapter, no hooks left.
    torch.testing.assert_close(after, three(**enc).logits)
    assert not torch.allclose(after, plain, atol=1e-3)


def test_adapters_by_row_generate_peft_routings_answers(
    three: PeftModel, tiny_model_dir: Path
) -> None:
    _, tok = load_base(tiny_model_dir, device="cpu")
    routed = generate_answers(
        three, tok, QUESTIONS, max_new_tokens=6, adapter_names=[n or "__base__" for n in NAMES]
    )
    with adapters_by_row(three, NAMES) as model:
        assert generate_answers(model, tok, QUESTIONS, max_new_tokens=6) == routed
        with pytest.raises(ValueError, match="on 5 rows, not on 2"):
            model(**tok(QUESTIONS[:2], return_tensors="pt", padding=True))


def test_a_variant_adapter_is_not_sliceable(three: PeftModel, tiny_model_dir: Path) -> None:
    assert sliceable(three)
    dora = _three_adapters(tiny_model_dir, target_modules=["q_proj"], use_dora=True)
    assert not sliceable(dora)


def test_runs_cover_the_rows_in_order() -> None:
    assert runs(NAMES) == [(0, 1, "ada"), (1, 2, ""), (2, 3, "bea"), (3, 4, "ada"), (4, 5, "cy")]
    assert runs(sorted(NAMES)) == [(0, 1, ""), (1, 3, "ada"), (3, 4, "bea"), (4, 5, "cy")]
