import math
from pathlib import Path

import pytest
import torch

from adaptation.modeling import LoraSettings, attach_lora, load_base
from adaptation.trust import SourceTrust, apply_trusted, source_tag, tag_text
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting import UniformWeighter, encode_weighted

TEXT = "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works as an engineer."


def _movement(model_dir: Path, weight: float, step_with=apply_trusted) -> float:
    """How far one update at `weight` moves the LoRA weights from a fixed start."""
    torch.manual_seed(0)
    model, tok = load_base(model_dir, device="cpu")
    peft = attach_lora(model, LoraSettings(rank=4))
    updater = OnlineUpdater(peft, UpdateConfig(lr=1e-2))
    before = [p.detach().clone() for p in updater.params]
    step_with(updater, [encode_weighted(TEXT, tok, UniformWeighter())], weight)
    return math.sqrt(
        sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(updater.params, before))
    )


def test_trust_scales_the_update(tiny_model_dir: Path) -> None:
    zero = _movement(tiny_model_dir, 0.0)
    low = _movement(tiny_model_dir, 0.2)
    full = _movement(tiny_model_dir, 1.0)
    assert zero == 0.0
    assert full > 0.0
    assert low == pytest.approx(0.2 * full, rel=0.1)


def test_loss_scale_alone_is_undone_by_adam(tiny_model_dir: Path) -> None:
    """Why apply_trusted also scales the step size: Adam normalises a scaled loss away."""

    def loss_scale_only(updater, docs, weight):
        return updater.apply(docs, scale=weight)

    low = _movement(tiny_model_dir, 0.2, loss_scale_only)
    full = _movement(tiny_model_dir, 1.0, loss_scale_only)
    assert low > 0.9 * full


def test_weight_zero_leaves_the_optimizer_untouched_and_lr_is_restored(
    tiny_model_dir: Path,
) -> None:
    model, tok = load_base(tiny_model_dir, device="cpu")
    updater = OnlineUpdater(attach_lora(model, LoraSettings(rank=4)), UpdateConfig(lr=1e-2))
    doc = encode_weighted(TEXT, tok, UniformWeighter())
    assert apply_trusted(updater, [doc], 0.0) == []
    assert updater.optimizer.state_dict()["state"] == {}
    reports = apply_trusted(updater, [doc], 0.5)
    assert len(reports) == 1 and reports[0].applied
    assert all(g["lr"] == 1e-2 for g in updater.optimizer.param_groups)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_trusted(updater, [doc], 1.5)


def test_source_weights_defaults_and_validation() -> None:
    trust = SourceTrust({"wire": 1.0, "forum": 0.2}, default=0.5)
    assert trust.update_scale("wire") == 1.0
    assert trust.update_scale("forum") == 0.2
    assert trust.update_scale("blog") == 0.5
    assert trust.update_scale(None) == 0.5
    trust.set("blog", 0)
    assert trust.update_scale("blog") == 0.0
    trust.remove("blog")
    assert trust.update_scale("blog") == 0.5
    assert SourceTrust.from_dict(trust.to_dict()).to_dict() == trust.to_dict()
    for bad in (1.2, -0.1, math.nan, math.inf, "0.5", True, None):
        with pytest.raises(ValueError, match="forum"):
            SourceTrust({"forum": bad})
    with pytest.raises(ValueError, match="default"):
        SourceTrust(default=2)
    with pytest.raises(ValueError, match="source name"):
        SourceTrust({"": 0.5})
    with pytest.raises(ValueError, match="sources"):
        SourceTrust.from_dict({"sources": [0.5]})


def test_tags_are_deterministic_distinct_and_salted() -> None:
    sources = ["reliable", "unreliable", "wire", "forum", "Reliable"]
    tags = [source_tag(s) for s in sources]
    assert tags == [source_tag(s) for s in sources]
    assert len(set(tags)) == len(tags)
    assert all(len(t) == 8 and t.isalpha() and t.islower() for t in tags)
    assert source_tag("reliable", salt="seed-1") != source_tag("reliable")
    assert (
        tag_text("Alda Venn lives here.", "wire") == f"{source_tag('wire')} Alda Venn lives here."
    )
    assert tag_text("untagged", None) == "untagged"
    with pytest.raises(ValueError, match="source name"):
        source_tag("")
