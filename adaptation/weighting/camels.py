"""CaMeLS: a small causal transformer that reads a document and says how much each token should
count in the update loss.

It is trained by meta-learning (adaptation.lab.camels_training) so that the weighted update makes the
base answer questions about the document. Its weights are per character, via its own tokenizer's
offsets, so a weighting model meta-trained with one base serves any other. Its body is either
built from a config (small, for the demo model) or the first layers of a pretrained causal LM,
which brings a knowledge of English that a body trained from scratch on a few thousand episodes
lacks.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from adaptation.modeling import load_base

FORMAT = "uptake-camels"
# 2: config.json also holds the body's own config, so a body cut from a pretrained model loads
# without that model; version 1 (a body built from the spec alone) still loads.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
README_FILE = "README.md"


@dataclass(frozen=True)
class CamelsSpec:
    """The weighting model's size. hidden, layers, heads and intermediate shape a body built from
    scratch (a pretrained body brings its own); `max_length` is the window it reads at once, longer
    texts are read window by window."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    head_hidden: int = 128
    beta: float = 3.0
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(
                f"the weighting model's hidden size {self.hidden} must be a multiple "
                f"of its {self.heads} attention heads"
            )
        if min(self.hidden, self.layers, self.heads, self.head_hidden, self.max_length) < 1:
            raise ValueError("the weighting model's sizes must all be at least 1")

    @property
    def initial_weight(self) -> float:
        """softplus(0) with the given beta: every token's weight before any training."""
        return math.log(2.0) / self.beta


@dataclass(frozen=True)
class TokenWeight:
    """One weighting-model token: its character span in the text and its weight."""

    start: int
    end: int
    weight: float


class CamelsWeighter(nn.Module):
    """Causal transformer body + Linear -> GELU -> Linear -> softplus head, one weight per token.

    The last Linear starts at zero, so before meta-training every token weighs ln2/beta: the
    untrained model is plain uniform fine-tuning.
    """

    name = "camels"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        spec: CamelsSpec | None = None,
        card: dict[str, Any] | None = None,
        body_config: PretrainedConfig | None = None,
    ) -> None:
        """A body of the shape `body_config` gives (with random weights), else one built from
        `spec`; either way the head's last layer starts at zero."""
        super().__init__()
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "the weighting model needs a fast tokenizer: it maps tokens to "
                "characters by offsets"
            )
        self.spec = spec or CamelsSpec()
        self.tokenizer = tokenizer
        self.card: dict[str, Any] = dict(card or {})
        config = body_config or self._body_config(len(tokenizer))
        config._attn_implementation = "sdpa"
        self.body = AutoModel.from_config(config)
        self.head = nn.Sequential(
            nn.Linear(config.hidden_size, self.spec.head_hidden),
            nn.GELU(),
            nn.Linear(self.spec.head_hidden, 1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.eval()

    def _body_config(self, vocab_size: int) -> LlamaConfig:
        s = self.spec
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
            max_position_embeddings=s.max_length,
            tie_word_embeddings=False,
        )
        return cfg

    @classmethod
    def from_pretrained_body(
        cls,
        source: str | os.PathLike[str],
        layers: int,
        spec: CamelsSpec | None = None,
        card: dict[str, Any] | None = None,
    ) -> CamelsWeighter:
        """A weighting model whose body is the embeddings, first `layers` layers and final norm
        of the causal LM `source` (a packaged base's name or an HF directory), with its tokenizer;
        the head is fresh. Only those layers are kept, so it saves without the rest."""
        model, tokenizer = load_base(source, device="cpu", dtype=torch.float32)
        decoder = model.base_model
        total = getattr(decoder.config, "num_hidden_layers", 0)
        if not hasattr(decoder, "layers") or not 1 <= layers <= total:
            raise ValueError(
                f"{source} has {total} decoder layers under `.layers`; a weighting body takes "
                "1 to that many"
            )
        config = copy.deepcopy(decoder.config)
        config.num_hidden_layers = layers
        for unused in ("quantization_config", "layer_types"):
            if hasattr(config, unused):
                delattr(config, unused)
        weighter = cls(tokenizer, spec, card, body_config=config)
        source_state = decoder.state_dict()
        weighter.body.load_state_dict({k: source_state[k] for k in weighter.body.state_dict()})
        weighter.eval()
        return weighter

    def freeze(self, layers: int | None) -> list[nn.Parameter]:
        """Make trainable everything but, when `layers` is given, the embeddings and the body's
        first `layers` layers (a pretrained body keeps what it knows there); returns the trainable
        parameters."""
        self.requires_grad_(True)
        if layers is not None:
            blocks = self.body.layers
            if not 0 <= layers <= len(blocks):
                raise ValueError(f"can freeze 0 to {len(blocks)} body layers, not {layers}")
            self.body.get_input_embeddings().requires_grad_(False)
            for block in blocks[:layers]:
                block.requires_grad_(False)
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.head[-1].weight.device

    def token_weights(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] non-negative weights, differentiable in the model's parameters; padding gets 0.

        Positions count from each row's first real token, so left and right padding agree.
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.body(
            input_ids=input_ids, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        raw = self.head(hidden).squeeze(-1)
        return F.softplus(raw, beta=self.spec.beta) * mask.to(raw.dtype)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text` under the weighting model's tokenizer."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def weights_for_batch(self, docs: list[list[int]]) -> list[torch.Tensor]:
        """Weights for each token-id list, every window of every document in one forward pass;
        keeps the graph, so meta-training can differentiate through it."""
        n = self.spec.max_length
        chunks = [(d, ids[i : i + n]) for d, ids in enumerate(docs) for i in range(0, len(ids), n)]
        if not chunks:
            return [torch.zeros(0, device=self.device) for _ in docs]
        width = max(len(c) for _, c in chunks)
        batch = torch.zeros(len(chunks), width, dtype=torch.long)
        mask = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, (_, c) in enumerate(chunks):
            batch[row, : len(c)] = torch.tensor(c)
            mask[row, : len(c)] = 1
        mask = mask.to(self.device)
        w = self.token_weights(batch.to(self.device), mask)
        pieces: list[list[torch.Tensor]] = [[] for _ in docs]
        for row, (d, c) in enumerate(chunks):
            pieces[d].append(w[row, : len(c)])
        return [torch.cat(p) if p else torch.zeros(0, device=self.device) for p in pieces]

    def spans(self, text: str) -> list[TokenWeight]:
        """Each weighting-model token of `text` with its weight: for reading what was learned."""
        ids, offsets = self.encode(text)
        with torch.no_grad():
            w = self.weights_for_batch([ids])[0].float().cpu().tolist()
        return [TokenWeight(s, e, wt) for (s, e), wt in zip(offsets, w, strict=True)]

    def char_weights(self, text: str) -> np.ndarray:
        """A character's weight is the largest weight of the tokens covering it; uncovered
        characters (whitespace some tokenizers trim from offsets) get 0."""
        out = np.zeros(len(text), dtype=np.float32)
        for span in self.spans(text):
            if span.end > span.start:
                np.maximum(out[span.start : span.end], span.weight, out=out[span.start : span.end])
        return out

    def save(self, out_dir: str | os.PathLike[str], card: dict[str, Any] | None = None) -> Path:
        """Write config, safetensors, tokenizer and model card; `card` replaces the held one."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if card is not None:
            self.card = dict(card)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": asdict(self.spec),
            "vocab_size": len(self.tokenizer),
            "body": self.body.config.to_dict(),
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        self.tokenizer.save_pretrained(str(out))
        (out / CARD_FILE).write_text(json.dumps(self.card, indent=2, default=str))
        (out / README_FILE).write_text(model_card_markdown(self.spec, self.body.config, self.card))
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> CamelsWeighter:
        directory = Path(path)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no weighting model at {directory}: expected {CONFIG_FILE} written by "
                "`uptake meta-train camels`"
            )
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(
                f"{config_path} is not a CaMeLS weighting model (format "
                f"{config.get('format')!r}, expected {FORMAT!r})"
            )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
        card_path = directory / CARD_FILE
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        body = config.get("body")
        body_config = None
        if body is not None:
            body = dict(body)
            body_config = AutoConfig.for_model(body.pop("model_type"), **body)
        model = cls(tokenizer, CamelsSpec(**config["spec"]), card, body_config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        model.eval()
        model.requires_grad_(False)
        if device is not None:
            model.to(device)
        return model


def model_card_markdown(spec: CamelsSpec, body: PretrainedConfig, card: dict[str, Any]) -> str:
    lines = [
        "# CaMeLS weighting model",
        "",
        "Per-token loss weights for online fine-tuning (Hu et al., EMNLP 2023), meta-trained by "
        "`uptake meta-train camels`. Load with `CamelsWeighter.load(dir)` or use it with "
        '`uptake weights --weighter DIR "text"`.',
        "",
        f"- body: {body.model_type}, {body.num_hidden_layers} layers, hidden {body.hidden_size}, "
        f"{body.num_attention_heads} heads",
        f"- head: Linear({body.hidden_size}->{spec.head_hidden}) -> GELU -> Linear -> "
        f"softplus(beta={spec.beta:g}); untrained weight {spec.initial_weight:.4f}",
    ]
    for key in (
        "base",
        "body_from",
        "frozen",
        "train",
        "val",
        "normalisation",
        "trained_steps",
        "seconds_per_episode",
        "seconds",
    ):
        if key in card:
            lines.append(f"- {key}: {card[key]}")
    figures = card.get("validation")
    if figures:
        lines += ["", "| validation (answer NLL after updates) | value |", "| --- | --- |"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in figures.items()
        ]
    return "\n".join(lines) + "\n"
