"""A CaMeLS weighting model whose body is cut from a pretrained causal LM: it keeps the source's
layers, freezes what it says, saves only what it holds, and still weighs any base's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adaptation.modeling import load_base
from adaptation.weighting import encode_weighted, project_to_tokens
from adaptation.weighting.camels import CONFIG_FILE, WEIGHTS_FILE, CamelsSpec, CamelsWeighter
from tests.conftest import tiny_tokenizer

SPEC = CamelsSpec(head_hidden=16, max_length=64)
TEXT = "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works as an engineer."


def _body(source: Path, layers: int = 1) -> CamelsWeighter:
    weighter = CamelsWeighter.from_pretrained_body(source, layers, SPEC)
    torch.manual_seed(0)
    with torch.no_grad():  # the untrained head weighs every token alike; spread it
        weighter.head[-1].weight.normal_(0.0, 2.0)
    return weighter


def test_the_body_is_the_source_models_first_layers(tiny_model_dir: Path) -> None:
    source, tokenizer = load_base(tiny_model_dir, device="cpu", dtype=torch.float32)
    weighter = _body(tiny_model_dir, layers=1)
    kept = weighter.body.state_dict()
    expected = source.base_model.state_dict()
    assert {"embed_tokens.weight", "norm.weight", "layers.0.mlp.up_proj.weight"} <= set(kept)
    assert not any(k.startswith("layers.1.") for k in kept), "only the first layer is kept"
    for name, tensor in kept.items():
        assert torch.equal(tensor, expected[name]), name
    assert weighter.head[0].in_features == source.config.hidden_size
    assert weighter.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_freezing_holds_the_embeddings_and_the_first_layers(tiny_model_dir: Path) -> None:
    weighter = _body(tiny_model_dir, layers=2)
    trainable = weighter.freeze(1)
    named = dict(weighter.named_parameters())
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert frozen and all(n.startswith(("body.embed_tokens.", "body.layers.0.")) for n in frozen)
    assert all(named[n].requires_grad for n in named if n.startswith(("body.layers.1.", "head.")))
    assert named["body.norm.weight"].requires_grad
    assert {id(p) for p in trainable} == {id(p) for p in named.values() if p.requires_grad}
    assert len(weighter.freeze(None)) == len(named), "None trains everything again"
    with pytest.raises(ValueError, match="0 to 2 body layers"):
        weighter.freeze(3)
    with pytest.raises(ValueError, match="1 to that many"):
        CamelsWeighter.from_pretrained_body(tiny_model_dir, 3, SPEC)


def test_a_truncated_body_saves_only_its_layers_and_loads_identically(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    weighter = _body(tiny_model_dir, layers=1)
    out = weighter.save(tmp_path / "w", card={"body_from": "tiny, first 1 layers"})
    saved = load_file(str(out / WEIGHTS_FILE))
    assert saved.keys() == weighter.state_dict().keys()
    assert not any(".layers.1." in k for k in saved)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["body"]["num_hidden_layers"] == 1
    assert "body: llama, 1 layers" in (out / "README.md").read_text()
    loaded = CamelsWeighter.load(out)
    for name, tensor in weighter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.encode(TEXT) == weighter.encode(TEXT)
    assert np.array_equal(loaded.char_weights(TEXT), weighter.char_weights(TEXT))


def test_its_character_weights_serve_another_tokenizer(tiny_model_dir: Path) -> None:
    weighter = _body(tiny_model_dir, layers=1)
    own = weighter.spans(TEXT)
    assert len({round(s.weight, 4) for s in own}) > 3, "the weights differ between tokens"
    other = tiny_tokenizer(vocab_size=300)
    enc = other(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] != weighter.encode(TEXT)[0], "a different tokenisation"
    weighted = encode_weighted(TEXT, other, weighter)
    expected = project_to_tokens(weighter.char_weights(TEXT), enc["offset_mapping"])
    assert np.allclose(weighted.weights.numpy(), expected)
    for (start, end), w in zip(enc["offset_mapping"], weighted.weights.tolist(), strict=True):
        if end > start:
            covering = [s.weight for s in own if s.start < end and start < s.end]
            assert w == pytest.approx(max(covering), rel=1e-6)


def test_a_version_1_directory_without_a_body_config_still_loads(tmp_path: Path) -> None:
    """Weighting models saved before bodies could be pretrained hold only the spec."""
    small = CamelsSpec(hidden=32, layers=1, heads=2, intermediate=64, head_hidden=16)
    out = CamelsWeighter(tiny_tokenizer(), small).save(tmp_path / "w")
    config = json.loads((out / CONFIG_FILE).read_text())
    del config["body"]
    (out / CONFIG_FILE).write_text(json.dumps(config | {"format_version": 1}))
    assert CamelsWeighter.load(out).body.config.hidden_size == 32
