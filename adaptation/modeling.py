"""Loading a causal LM and attaching a LoRA adapter, the same way for a demo model or a hub one."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from adaptation.bases import resolve_base

# Attention and MLP projections across the Llama/Qwen2 (q_proj ...) and GPT-2 (c_attn ...) families:
# new facts are stored largely in the MLPs, so they are adapted too.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
)


# from_pretrained builds models under a process-wide meta-device context: two threads loading at
# once (an API engine and an in-process worker) corrupt each other's weights.
_LOAD_LOCK = threading.Lock()
# Reproducible initialisation and sampling seed torch's global generators, which every thread of
# a process shares: a thread that draws from them while another may be seeding them (a serving
# engine loading adapters, whose initialisation draws, beside an in-process worker) holds this.
RNG_LOCK = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on freshly seeded generators, under RNG_LOCK, and restore them after."""
    with RNG_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are slow on most chips (the service's
    `UPTAKE_DTYPE=auto` picks bf16 on a CPU that has it in hardware: `cpu_has_native_bf16`)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def base_dtype(device: str | torch.device | None, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype `load_base` gives a base: `dtype`, else the device's default."""
    dev = torch.device(device) if device is not None else default_device()
    return dtype if dtype is not None else default_dtype(dev)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), where bf16 weights
    make steps and answers faster; elsewhere it is emulated and slower. False where unknown."""
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_named(name: str | None) -> torch.dtype | None:
    """A dtype by name (`float32`, `bfloat16`); None or `auto`: the device's default."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_base(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, a hub id or a packaged base's
    short name (converted on first use), ready for inference."""
    dev = torch.device(device) if device is not None else default_device()
    dt = base_dtype(dev, dtype)
    with _LOAD_LOCK:  # a conversion loads a model too
        path = resolve_base(str(name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    prepare_tokenizer(tokenizer)
    model.to(dev)
    model.eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder-only batching needs a pad token and left padding; many hub tokenizers lack both."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


@dataclass(frozen=True)
class LoraSettings:
    """The adapter the service trains. Modules absent from a model are skipped, so one default fits
    Llama, Qwen2 and GPT-2 alike."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)


def context_window(model: PreTrainedModel) -> int | None:
    """The most positions the model reads (prompt plus generated tokens); None if unstated."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def present_target_modules(model: torch.nn.Module, wanted: tuple[str, ...]) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [m for m in wanted if m in names]
    if not found:
        raise ValueError(
            f"none of the LoRA target modules {list(wanted)} exist in {type(model).__name__}; "
            "set them explicitly (e.g. UPTAKE_LORA_TARGETS=q_proj,v_proj)"
        )
    return found


def lora_config(model: torch.nn.Module, settings: LoraSettings) -> LoraConfig:
    targets = present_target_modules(model, settings.target_modules)
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=stores_weights_transposed(model, targets),
        task_type="CAUSAL_LM",
    )


def stores_weights_transposed(model: torch.nn.Module, targets: list[str]) -> bool:
    """GPT-2's Conv1D keeps its weight as (in, out); peft must be told, or it warns and guesses."""
    return any(
        isinstance(module, Conv1D) and any(part in targets for part in name.split("."))
        for name, module in model.named_modules()
    )


def attach_lora(
    model: PreTrainedModel, settings: LoraSettings | None = None, adapter_name: str = "default"
) -> PeftModel:
    """Wrap the base in a fresh, trainable LoRA adapter; the base weights stay frozen."""
    return get_peft_model(
        model, lora_config(model, settings or LoraSettings()), adapter_name=adapter_name
    )


def without_adapters(model: torch.nn.Module) -> AbstractContextManager[object]:
    """A block in which the model is its bare base (a PeftModel's adapters off); a model without
    adapters is itself. The base writes self-edits and probes, so they do not depend on what has
    been learned."""
    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A copy of the adapter's weights, which later training does not change."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_adapter_state(
    state: dict[str, torch.Tensor], config: PeftConfig, out_dir: str | os.PathLike[str]
) -> Path:
    """Write weights from `adapter_state` as peft's `save_pretrained` lays an adapter out (a
    flat, loadable directory), without touching the live model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    saved = copy.deepcopy(config)
    saved.inference_mode = True
    saved.save_pretrained(str(out))
    return out


def save_adapter(
    model: PeftModel, out_dir: str | os.PathLike[str], adapter_name: str = "default"
) -> Path:
    return save_adapter_state(
        adapter_state(model, adapter_name), model.peft_config[adapter_name], out_dir
    )
