"""Online updates: documents applied one at a time to a LoRA adapter with a weighted LM loss.

The optimizer lives as long as the stream, so its moments carry across documents. A step whose
loss is NaN or explodes is undone, never applied.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from adaptation.weighting.base import WeightedText

Normalisation = Literal["tokens", "weights", "fixed"]


@dataclass(frozen=True)
class UpdateConfig:
    """How each document is learned.

    normalisation: how the weighted loss is scaled.
      - "tokens": divide by the real token count (a per-token mean; the usual LM loss).
      - "weights": divide by the sum of weights (a weighted mean; the weights' scale cancels).
      - "fixed": divide by `fixed_length`, as the CaMeLS reference does, so short documents get
        proportionally smaller updates.
    """

    lr: float = 1e-3
    steps_per_doc: int = 1
    normalisation: Normalisation = "tokens"
    fixed_length: int = 1024
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    divergence_factor: float = 8.0
    divergence_window: int = 32


def weighted_lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    normalisation: Normalisation = "tokens",
    fixed_length: int = 1024,
) -> torch.Tensor:
    """Next-token cross-entropy, each target token's loss scaled by its weight; padding gets 0.

    Shapes: logits [B, T, V], input_ids/weights/attention_mask [B, T]. Returns a scalar: the
    batch mean of the per-sequence normalised losses.
    """
    targets = input_ids[:, 1:]
    w = weights[:, 1:].to(logits.dtype)
    mask = (
        attention_mask[:, 1:].to(logits.dtype) if attention_mask is not None else torch.ones_like(w)
    )
    w = w * mask
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    total = (nll * w.float()).sum(dim=1)
    if normalisation == "tokens":
        denom = mask.float().sum(dim=1).clamp(min=1.0)
    elif normalisation == "weights":
        denom = w.float().sum(dim=1).clamp(min=1e-6)
    elif normalisation == "fixed":
        denom = torch.full_like(total, float(fixed_length))
    else:
        raise ValueError(f"unknown loss normalisation {normalisation!r}")
    return (total / denom).mean()


@dataclass(frozen=True)
class StepReport:
    loss: float
    applied: bool
    reason: str | None = None


@dataclass(frozen=True)
class UpdaterSnapshot:
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    recent: tuple[float, ...]
    steps_applied: int
    steps_rolled_back: int


class OnlineUpdater:
    """Takes weighted gradient steps on the trainable (LoRA) parameters of `model`."""

    def __init__(self, model: torch.nn.Module, config: UpdateConfig | None = None) -> None:
        self.model = model
        self.config = config or UpdateConfig()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: attach a LoRA adapter first")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        self._recent: deque[float] = deque(maxlen=self.config.divergence_window)
        self.steps_applied = 0
        self.steps_rolled_back = 0
        self._recording = True

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def loss(self, batch: list[WeightedText], scale: float = 1.0) -> torch.Tensor:
        ids, weights, mask = pad_batch(batch, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        cfg = self.config
        return scale * weighted_lm_loss(
            logits, ids, weights, mask, cfg.normalisation, cfg.fixed_length
        )

    def apply(self, docs: list[WeightedText], scale: float = 1.0) -> list[StepReport]:
        """Apply `steps_per_doc` steps on one micro-batch of documents (usually one document).

        Only the first step's loss joins the explosion check's record of typical losses: later
        steps see text already partly learned, and with many steps per document their low
        losses would make the next new document look exploded.
        """
        return [
            self.step(docs, scale, record=i == 0 and self._recording)
            for i in range(self.config.steps_per_doc)
        ]

    @contextmanager
    def unrecorded(self) -> Iterator[None]:
        """Steps taken inside leave the explosion check's record of typical losses alone: a
        rehearsed document was learned before, and its low loss would make the next new
        document look exploded."""
        self._recording = False
        try:
            yield
        finally:
            self._recording = True

    def step(self, docs: list[WeightedText], scale: float = 1.0, record: bool = True) -> StepReport:
        was_training = self.model.training
        self.model.train()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(docs, scale)
            value = float(loss.detach())
            reason = self._diverged(value)
            if reason:
                return self._reject(value, reason)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                return self._reject(value, "non-finite gradient")
            backup = self.snapshot()
            self.optimizer.step()
            if not all(torch.isfinite(p).all() for p in self.params):
                self.restore(backup)
                return self._reject(value, "step produced non-finite weights")
            if record:
                self._recent.append(value)
            self.steps_applied += 1
            return StepReport(loss=value, applied=True)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)

    def snapshot(self) -> UpdaterSnapshot:
        """Everything a step changes, to come back to: for a step undone, or for several updates
        tried from the same state, of which only the one kept should count."""
        return UpdaterSnapshot(
            params=[p.detach().clone() for p in self.params],
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            recent=tuple(self._recent),
            steps_applied=self.steps_applied,
            steps_rolled_back=self.steps_rolled_back,
        )

    def restore(self, snap: UpdaterSnapshot) -> None:
        """Back to `snap`, as if nothing since had happened; it stays valid for another restore."""
        with torch.no_grad():
            for p, saved in zip(self.params, snap.params, strict=True):
                p.copy_(saved)
        # load_state_dict may keep references to the given tensors; later steps must not touch snap.
        self.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        self._recent.clear()
        self._recent.extend(snap.recent)
        self.steps_applied = snap.steps_applied
        self.steps_rolled_back = snap.steps_rolled_back

    @property
    def typical_loss(self) -> float | None:
        """The median first-step loss of the recent documents: what the explosion check compares
        a new loss with (None until a few documents have been seen)."""
        if len(self._recent) < 4:
            return None
        return sorted(self._recent)[len(self._recent) // 2]

    def _diverged(self, value: float) -> str | None:
        if not math.isfinite(value):
            return f"loss is {value}"
        typical = self.typical_loss
        if typical is not None and value > self.config.divergence_factor * max(typical, 1e-3):
            return f"loss {value:.3g} exploded (typical {typical:.3g})"
        return None

    def _reject(self, value: float, reason: str) -> StepReport:
        self.steps_rolled_back += 1
        return StepReport(loss=value, applied=False, reason=reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "recent": list(self._recent),
            "steps_applied": self.steps_applied,
            "steps_rolled_back": self.steps_rolled_back,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume a stream. The configured learning rate wins over the saved one, so a stream
        resumed under a new rate takes its next steps at that rate."""
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr
        self._recent.clear()
        self._recent.extend(state.get("recent", []))
        self.steps_applied = int(state.get("steps_applied", 0))
        self.steps_rolled_back = int(state.get("steps_rolled_back", 0))


def pad_batch(
    batch: list[WeightedText], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad for training (the loss masks padding, so the side does not matter here)."""
    length = max(d.num_tokens for d in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    weights = torch.zeros(len(batch), length)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, d in enumerate(batch):
        n = d.num_tokens
        ids[i, :n] = d.input_ids
        weights[i, :n] = d.weights
        mask[i, :n] = 1
    return ids.to(device), weights.to(device), mask.to(device)
