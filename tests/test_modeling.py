from pathlib import Path

import pytest
import torch

from adaptation.modeling import LoraSettings, attach_lora, load_base, lora_parameters, save_adapter
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting.base import WeightedText


@pytest.mark.filterwarnings("error:fan_in_fan_out:UserWarning")
def test_load_and_attach_lora_on_each_family(tiny_family_dir: Path, tmp_path: Path) -> None:
    model, tok = load_base(tiny_family_dir, device="cpu")
    assert model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token is not None
    peft_model = attach_lora(model, LoraSettings(rank=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(lora_parameters(peft_model)) == set(trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    ids = torch.tensor(tok("Alda Venn was born in Marrow Bay.")["input_ids"])
    upd = OnlineUpdater(peft_model, UpdateConfig(lr=1e-2))
    report = upd.apply([WeightedText(ids, torch.ones(len(ids)))])
    assert report[0].applied
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "base weights must stay frozen"
    out = save_adapter(peft_model, tmp_path / "snap")
    assert (out / "adapter_model.safetensors").exists()


def test_unknown_target_modules_is_a_clear_error(tiny_model_dir: Path) -> None:
    model, _ = load_base(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="LoRA target modules"):
        attach_lora(model, LoraSettings(target_modules=("nope",)))
