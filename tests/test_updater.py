import math

import torch

from adaptation.modeling import LoraSettings, attach_lora, load_base
from adaptation.updater import OnlineUpdater, UpdateConfig, weighted_lm_loss
from adaptation.weighting.base import WeightedText


def _doc(tok, text: str = "Alda Venn was born in Marrow Bay in 1961.") -> WeightedText:
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    return WeightedText(ids, torch.ones(len(ids)))


def test_weighted_loss_ignores_zero_weights_and_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 11)
    ids = torch.randint(0, 11, (1, 5))
    full = weighted_lm_loss(logits, ids, torch.ones(1, 5), normalisation="weights")
    masked = weighted_lm_loss(
        logits, ids, torch.tensor([[1.0, 1, 1, 0, 0]]), normalisation="weights"
    )
    head = weighted_lm_loss(logits[:, :3], ids[:, :3], torch.ones(1, 3), normalisation="weights")
    assert torch.allclose(masked, head)
    assert not torch.allclose(full, masked)
    fixed = weighted_lm_loss(logits, ids, torch.ones(1, 5), normalisation="fixed", fixed_length=100)
    tokens = weighted_lm_loss(logits, ids, torch.ones(1, 5), normalisation="tokens")
    assert torch.allclose(fixed * 100, tokens * 4)


def test_a_step_lowers_the_loss_on_its_document(tiny_model_dir) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    upd = OnlineUpdater(peft, UpdateConfig(lr=3e-2, steps_per_doc=3))
    doc = _doc(tok)
    reports = upd.apply([doc])
    assert all(r.applied for r in reports)
    assert reports[-1].loss < reports[0].loss


def test_nan_loss_is_rolled_back_not_applied(tiny_model_dir) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    upd = OnlineUpdater(peft, UpdateConfig(lr=1e-2))
    doc = _doc(tok)
    upd.apply([doc])
    before = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    opt_before = upd.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    poisoned = WeightedText(doc.input_ids, torch.full_like(doc.weights, math.nan))
    report = upd.apply([poisoned])[0]
    assert not report.applied and "nan" in report.reason.lower()
    after = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(opt_before, upd.optimizer.state_dict()["state"][0]["exp_avg"])
    assert upd.steps_rolled_back == 1


def test_exploding_loss_is_rolled_back(tiny_model_dir) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    upd = OnlineUpdater(peft, UpdateConfig(lr=1e-4, divergence_factor=4.0))
    doc = _doc(tok)
    for _ in range(5):
        assert upd.apply([doc])[0].applied
    report = upd.apply([doc], scale=100.0)[0]
    assert not report.applied and "exploded" in report.reason


def test_the_explosion_check_compares_with_first_step_losses(tiny_model_dir) -> None:
    """Later steps on a text see it partly learned; with many steps per document their low
    losses would make the next new document look exploded."""
    model, tok = load_base(tiny_model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=8))
    upd = OnlineUpdater(peft, UpdateConfig(lr=3e-2, steps_per_doc=3))
    firsts = []
    for text in ("Alda Venn was born in Marrow Bay.", "Port Selka is mild.", "42 said so."):
        reports = upd.apply([_doc(tok, text)])
        firsts.append(reports[0].loss)
        assert upd.typical_loss is None, "no yardstick before four documents"
    reports = upd.apply([_doc(tok)])
    firsts.append(reports[0].loss)
    assert upd.typical_loss == sorted(firsts)[2]


def test_overlong_prompts_are_cut_to_the_window(tiny_family_dir) -> None:
    """GPT-2's learned positions fail past the window, so without the cut this raises."""
    from adaptation.answering import generate_answers

    model, tok = load_base(tiny_family_dir, device="cpu")
    window = model.config.max_position_embeddings
    context = "filler words here " * window
    out = generate_answers(
        model, tok, ["Where was Alda Venn born?"], contexts=[context], max_new_tokens=4
    )
    assert len(out) == 1


def test_loading_a_state_returns_the_updater_to_it(tiny_model_dir) -> None:
    """Loading replaces what the updater has seen since, so a saved stream state can be
    returned to and not only resumed."""
    model, tok = load_base(tiny_model_dir, device="cpu")
    upd = OnlineUpdater(attach_lora(model, LoraSettings(rank=4)), UpdateConfig(lr=1e-3))
    for text in ("Alda Venn was born in Marrow Bay.", "Port Selka is mild.", "42 said so."):
        upd.apply([_doc(tok, text)])
    saved = upd.state_dict()
    for text in ("Tova Renn left Gale Works.", "Omar Quill is a pilot."):
        upd.apply([_doc(tok, text)])
    upd.load_state_dict(saved)
    assert upd.state_dict()["recent"] == saved["recent"]
    assert upd.typical_loss is None and upd.steps_applied == 3
