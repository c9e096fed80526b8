"""The one weighting interface: weights per character, projected onto any tokenizer.

Weighting by characters rather than tokens is what lets one weighter (or one meta-trained
weighting model) serve bases with different tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class Weighter(Protocol):
    name: str

    def char_weights(self, text: str) -> np.ndarray:
        """One non-negative float32 weight per character of `text`."""
        ...


def project_to_tokens(char_weights: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """A token's weight is the largest weight of the characters it covers.

    Tokenizers that trim offsets give a lone whitespace token an empty span; it takes the weight
    of the character where it sits, so uniform weighting stays uniform.
    """
    out = np.zeros(len(offsets), dtype=np.float32)
    n = len(char_weights)
    for i, (start, end) in enumerate(offsets):
        if end > start:
            out[i] = float(char_weights[start:end].max())
        elif n:
            out[i] = float(char_weights[min(start, n - 1)])
    return out


@dataclass(frozen=True)
class WeightedText:
    """A tokenised document with the loss weight of predicting each token (position 0 is unused)."""

    input_ids: torch.Tensor
    weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def encode_weighted(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    weighter: Weighter,
    max_length: int = 1024,
) -> WeightedText:
    enc = tokenizer(
        text,
        return_offsets_mapping=True,
        add_special_tokens=False,
        truncation=True,
        max_length=max_length,
    )
    weights = project_to_tokens(weighter.char_weights(text), enc["offset_mapping"])
    return WeightedText(
        input_ids=torch.tensor(enc["input_ids"], dtype=torch.long),
        weights=torch.from_numpy(weights),
    )
