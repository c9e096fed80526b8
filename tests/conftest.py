"""Shared fixtures: tiny randomly initialised models built from configs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from threads, and on a shared 2-core machine competing thread pools
# thrash; subprocesses (workers, servers) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Behaviour is tested in float32 on any CPU; the dtype choice has its own tests (test_dtype.py).
os.environ.setdefault("UPTAKE_DTYPE", "float32")

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from adaptation.bases import DEFAULT_BASE, resolve_base
from adaptation.lab.tokenizer import train_bpe_tokenizer
from adaptation.mac.networks import MacConfig
from adaptation.mac.system import MacSystem
from adaptation.modeling import load_base
from adaptation.prompts import answer_batch

torch.set_num_threads(1)

CORPUS = [
    "Question: Where was Alda Venn born?\nAnswer: Marrow Bay\n",
    "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works as an engineer.",
    "The weather in Port Selka stayed mild, said 42 residents on Tuesday, 3 March 2011.",
    "Super Bowl 50 was an American football game played on February 7, 2016.",
] * 20


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(CORPUS, vocab_size=vocab_size)


def tiny_model(family: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    llama_like = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**llama_like))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**llama_like))
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512)
        return GPT2LMHeadModel(cfg)
    raise ValueError(family)


def one_padded_pass(
    model: torch.nn.Module, batch: list[tuple[list[int], int]], pad_id: int
) -> float:
    """The plain pretraining step the demo's split step must equal: the whole batch padded to
    its longest sequence, logits everywhere, the Hugging Face loss."""
    ids, labels, mask = answer_batch(batch, pad_id)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.item()


def save_tiny(path: Path, family: str = "llama") -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(family, len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_mac_system(model_dir: Path, **sizes: int) -> MacSystem:
    """Untrained MAC networks, a few thousand parameters, for the tiny base at `model_dir`."""
    torch.manual_seed(0)
    model, tok = load_base(model_dir, device="cpu")
    shape = dict(width=32, layers=1, query_layers=1, num_tokens=4, window=4, chunk=2)
    shape.update(sizes)
    return MacSystem.create(model, tok, MacConfig.for_base(model, len(tok), **shape))


class RecordingWeighter:
    """Uniform weights; remembers every text it weighted, i.e. every training sequence."""

    name = "uniform"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def char_weights(self, text: str) -> np.ndarray:
        self.texts.append(text)
        return np.ones(len(text), dtype=np.float32)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged default base converted once into a fresh home (30 to 40 s), shared by every
    test that needs the real model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPTAKE_HOME", str(tmp_path_factory.mktemp("home")))
        return Path(resolve_base(DEFAULT_BASE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with its tokenizer: a standard HF directory, like the demo model."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def tiny_family_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return save_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_mac_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MAC networks for `tiny_model_dir`, saved as `uptake meta-train mac` saves them."""
    return tiny_mac_system(tiny_model_dir).save(tmp_path_factory.mktemp("tiny-mac"))


@pytest.fixture(scope="session")
def quick_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick demo model and its world (it knows little; for plumbing, not learning)."""
    from adaptation.lab.bootstrap import build_demo_model

    home = tmp_path_factory.mktemp("uptake-home")
    build_demo_model(out_dir=home / "demo-quick", world_dir=home / "world-quick", quick=True)
    return home
