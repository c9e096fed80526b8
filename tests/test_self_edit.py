import json
from pathlib import Path

import pytest
import torch

from adaptation.data import QA, Document
from adaptation.learner import edit_sequences
from adaptation.modeling import LoraSettings, attach_lora, load_base
from adaptation.prompts import SELF_EDIT_PROMPTS, self_edit_prompt, self_edit_request
from adaptation.self_edit import (
    apply_with_self_edits,
    parse_qa_pairs,
    parse_self_edits,
    training_sequences,
    write_generations,
)
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting import UniformWeighter, encode_weighted

SELF_EDITS = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "squad_dev200_selfedits_rewrite_qwen2.5-7b.json"
)


def test_blank_lines_split_and_wrapped_lines_stay_together() -> None:
    text = (
        "Alda Venn was born in Marrow Bay.\n\n\n"
        "She works for Quillon Works\nas an engineer since 1990.\n\n"
    )
    assert parse_self_edits(text) == [
        "Alda Venn was born in Marrow Bay.",
        "She works for Quillon Works\nas an engineer since 1990.",
    ]


def test_rules_split() -> None:
    text = (
        "The first rewrite of the passage.\n---\nThe second rewrite of it.\n***\nA third one here."
    )
    assert parse_self_edits(text) == [
        "The first rewrite of the passage.",
        "The second rewrite of it.",
        "A third one here.",
    ]


def test_numbered_items_split_even_without_blank_lines() -> None:
    text = (
        "Implications:\n"
        "1. Alda Venn was born in 1961.\n"
        "2) Alda Venn works for Quillon Works,\n   a firm in Marrow Bay.\n"
        "10. Quillon Works employs an engineer.\n"
        "- Marrow Bay is Alda Venn's hometown."
    )
    assert parse_self_edits(text) == [
        "Alda Venn was born in 1961.",
        "Alda Venn works for Quillon Works,\na firm in Marrow Bay.",
        "Quillon Works employs an engineer.",
        "Marrow Bay is Alda Venn's hometown.",
    ]


def test_fragments_labels_headings_and_repeats_are_dropped() -> None:
    text = (
        "**Passage 1:**\n\nAlda Venn was born in 1961.\n\n3.\n\nToo short.\n\n"
        "Alda Venn was born in 1961.\n\n2. ok then\n### Her career so far\n"
        "- **Rewrite 2**\n  She works for **Quillon Works** now.\n--- Passage 3 ---\n"
        "**1. Alda Venn lives in Port Selka.**"
    )
    assert parse_self_edits(text) == [
        "Alda Venn was born in 1961.",
        "She works for Quillon Works now.",
        "Alda Venn lives in Port Selka.",
    ]
    assert parse_self_edits("") == []
    assert parse_self_edits("one two three", min_words=3) == ["one two three"]


def test_self_qa_pairs_are_kept_whole_and_parsed() -> None:
    text = (
        "Question: Where was Alda Venn born?\nAnswer: Marrow Bay\n\n"
        "Question: Who employs Alda Venn?\nAnswer: Quillon Works\n\nQuestion: unanswered?"
    )
    edits = parse_self_edits(text)
    assert edits[0] == "Question: Where was Alda Venn born?\nAnswer: Marrow Bay"
    assert parse_qa_pairs(text) == [
        QA("Where was Alda Venn born?", ("Marrow Bay",)),
        QA("Who employs Alda Venn?", ("Quillon Works",)),
    ]


@pytest.mark.skipif(not SELF_EDITS.exists(), reason="shared/data is not beside the checkout")
def test_real_rewrites_split_into_substantial_sequences() -> None:
    records = json.loads(SELF_EDITS.read_text(encoding="utf-8"))[:20]
    for r in records:
        for completion in r["completions"]:
            seqs = parse_self_edits(completion)
            assert seqs, completion[:200]
            assert all(len(s.split()) >= 4 for s in seqs)
            assert not any(s.startswith(("*", "#", "-")) or s[:2] in ("1.", "2.") for s in seqs)
    yuan = records[5]["completions"][0]
    assert yuan.count("\n---\n") == 4 and len(parse_self_edits(yuan)) == 5


def test_training_sequences_are_title_prefixed_and_include_the_passage() -> None:
    seqs = training_sequences(
        "Alda Venn",
        "Alda Venn was born in Marrow Bay.",
        ["She is an engineer at Quillon Works.", "Alda Venn\nShe lives in Port Selka.", "  "],
    )
    assert seqs == [
        "Alda Venn\nAlda Venn was born in Marrow Bay.",
        "Alda Venn\nShe is an engineer at Quillon Works.",
        "Alda Venn\nShe lives in Port Selka.",
    ]
    assert training_sequences(None, "The passage.", ["An edit of it."]) == [
        "The passage.",
        "An edit of it.",
    ]
    doc = Document(
        id="d",
        text="Super Bowl 50 was played in 2016.",
        title="Super Bowl 50",
        self_edits=("1. The game took place in 2016.\n2. It was the fiftieth Super Bowl.",),
    )
    edits = parse_self_edits(doc.self_edits[0]) + ["Super Bowl 50 was played in 2016."]
    assert edit_sequences(doc, edits, chunk_chars=4000) == [  # the repeat of the text is dropped
        "Super Bowl 50\nThe game took place in 2016.",
        "Super Bowl 50\nIt was the fiftieth Super Bowl.",
    ]


def test_prompts_render_and_unknown_names_are_rejected() -> None:
    assert set(SELF_EDIT_PROMPTS) == {"implications", "long-implications", "rewrite", "self-qa"}
    for name in SELF_EDIT_PROMPTS:
        text = self_edit_prompt(name, "Alda Venn", "She was born in 1961.")
        assert "Alda Venn\nShe was born in 1961." in text
    assert self_edit_prompt("Summarise: {passage}", None, " x ") == "Summarise: x"
    with pytest.raises(ValueError, match="implications"):
        self_edit_prompt("implication", "t", "p")


def test_written_generations_are_k_samples_the_seed_repeats(tiny_model_dir: Path) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    request = self_edit_request(tok, "implications", "Alda Venn", "Alda Venn was born in 1961.")
    gens = write_generations(model, tok, request, k=3, max_new_tokens=40, seed=7)
    assert len(gens) == 3 and all(isinstance(g, str) for g in gens)
    assert gens[0] != gens[1] or gens[1] != gens[2], "sampling should vary the generations"
    assert write_generations(model, tok, request, k=3, max_new_tokens=40, seed=7) == gens
    assert write_generations(model, tok, request, k=3, max_new_tokens=40, seed=8) != gens


def test_apply_masks_padding_loss_is_mean_of_lone_losses(tiny_model_dir: Path) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    with torch.no_grad():  # a non-zero B so the adapter affects the loss
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    upd = OnlineUpdater(peft, UpdateConfig(lr=1e-2))
    weighter = UniformWeighter()
    seqs = training_sequences(
        "Alda Venn",
        "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works.",
        ["She is an engineer.", "Question: Where was Alda Venn born?\nAnswer: Marrow Bay"],
    )
    lengths = {encode_weighted(s, tok, weighter).num_tokens for s in seqs}
    assert len(lengths) == 3, "sequences of different lengths make the batch padded"
    with torch.no_grad():
        alone = [float(upd.loss([encode_weighted(s, tok, weighter)])) for s in seqs]
    before = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    reports = apply_with_self_edits(upd, tok, weighter, seqs, batch_size=8)
    assert len(reports) == 1 and reports[0].applied
    assert reports[0].loss == pytest.approx(sum(alone) / len(alone), rel=1e-5)
    assert any(not torch.equal(before[n], p) for n, p in peft.named_parameters() if n in before)
    assert len(apply_with_self_edits(upd, tok, weighter, seqs, batch_size=2)) == 2
