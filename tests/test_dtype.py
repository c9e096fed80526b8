"""UPTAKE_DTYPE: auto picks bfloat16 on a CPU that multiplies it in hardware, and a bfloat16
base still learns and answers through the worker's backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import service.settings as settings_module
from adaptation.data import Document
from adaptation.modeling import cpu_has_native_bf16, dtype_named
from service.backends.lora import LoraModels, build_weighter
from tests.servicekit import make_settings


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx512f avx512bw avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_a_cpu_that_has_it(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "cpu_has_native_bf16", lambda: native)
    s = make_settings(tmp_path, tmp_path, "redis://unused", "p", dtype="auto", device="cpu")
    assert s.torch_dtype() == (torch.bfloat16 if native else None)
    assert s.torch_dtype(serving=True) is None  # answers stay float32 on a CPU
    for name in ("float32", "bfloat16"):
        chosen = s.model_copy(update={"dtype": name})
        assert chosen.torch_dtype() == chosen.torch_dtype(serving=True) == getattr(torch, name)


def test_unknown_dtype_names_are_refused() -> None:
    assert dtype_named("auto") is None and dtype_named(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        dtype_named("float16")


def test_a_bf16_base_learns_and_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = make_settings(tiny_model_dir, tmp_path, "redis://unused", "p", dtype="bfloat16")
    models = LoraModels(s, build_weighter(s))
    backend = models.open("ns", None, s)
    assert models.base.dtype == torch.bfloat16
    lora = [p for n, p in backend.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # trained in full precision
    before = [p.detach().clone() for p in lora]
    result = backend.ingest(Document("d1", "Alda Venn works for Quillon Works in Marrow town."))
    assert result.applied and result.tokens > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, lora, strict=True))
    [answer] = backend.answer(["Where does Alda Venn work?"])
    assert isinstance(answer, str)
    written = tmp_path / "snap"
    written.mkdir()
    backend.write_state(written)
    assert (written / "adapter_model.safetensors").stat().st_size > 0
