"""Answering a batch whose rows use different LoRA adapters at about the cost of one adapter.

peft routes a mixed batch row by row in every LoRA layer: for each adapter in the batch it gathers
that adapter's rows (a copy), runs them through A and B, and scatters them back. On a CPU those
copies, per adapter, per layer, per generated token, cost more than batching saves. When the rows
of each adapter are contiguous, as they are once the batch is sorted by adapter, each adapter's
delta is computed on a slice of the batch (a view) and added to that slice of the base layer's
output in place: the same arithmetic as one adapter for the whole batch, and no copies. Stacking
all adapters' A matrices into one (rank k x r, a per-row mask keeping each row's own block) was
measured too: fewer operations, but k times the LoRA arithmetic, and slower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

Hook = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]
Run = tuple[int, int, str]


def sliceable(model: PeftModel) -> bool:
    """Whether every LoRA layer is plain LoRA (no DoRA or other variant), which slicing needs."""
    return all(not m.lora_variant for m in model.modules() if isinstance(m, LoraLinear))


def runs(names: Sequence[str]) -> list[Run]:
    """(start, end, name) for each run of equal consecutive names."""
    out: list[Run] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            out.append((start, i, names[start]))
            start = i
    return out


@contextmanager
def adapters_by_row(model: PeftModel, names: Sequence[str]) -> Iterator[PeftModel]:
    """Within it, row i of an inference forward of `model` runs through adapter `names[i]` (""
    for none). Sort the rows by name first: each run of equal names costs one slice per layer.
    The model's own adapters are disabled meanwhile; another batch size is refused."""
    spans = [r for r in runs(names) if r[2]]
    hooks = []
    try:
        with model.disable_adapter():
            for module in model.modules():
                if isinstance(module, LoraLinear):
                    pieces = _pieces(module, spans)
                    if pieces:
                        hooks.append(module.register_forward_hook(_adder(pieces, len(names))))
            yield model
    finally:
        for hook in hooks:
            hook.remove()


def _pieces(
    module: LoraLinear, spans: Sequence[Run]
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, end, A, scaled B) for each span whose adapter touches this layer."""
    return [
        (start, end, module.lora_A[name].weight, module.lora_B[name].weight * module.scaling[name])
        for start, end, name in spans
        if name in module.lora_A
    ]


def _adder(pieces: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]], rows: int) -> Hook:
    """A forward hook adding each span's adapter delta to its rows of the base layer's output."""

    def hook(
        module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        x = args[0]
        if x.shape[0] != rows or output.requires_grad:
            raise ValueError(
                f"adapters by row were set for inference on {rows} rows, not on {x.shape[0]}"
                + (" with gradient" if output.requires_grad else "")
            )
        for start, end, a, b in pieces:
            delta = (x[start:end].to(a.dtype) @ a.T) @ b.T
            output[start:end] += delta.to(output.dtype)
        return output

    return hook
