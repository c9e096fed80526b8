"""The baseline: every character, hence every token, counts the same."""

from __future__ import annotations

import numpy as np


class UniformWeighter:
    """Plain fine-tuning expressed as a weighter, so every strategy runs through one code path."""

    name = "uniform"

    def char_weights(self, text: str) -> np.ndarray:
        return np.ones(len(text), dtype=np.float32)
