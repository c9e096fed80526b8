"""The CPU settings study on a tiny model: every variant is timed and compared with float32."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptation.lab.cpu_options import VARIANTS, run_cpu_options
from adaptation.weighting.uniform import UniformWeighter

TEXTS = [
    "Ada Lovelace wrote the first published program for the Analytical Engine in 1843.",
    "The Rhine flows from the Swiss Alps through Germany to the North Sea at Rotterdam.",
    "Marie Curie won Nobel prizes in physics in 1903 and in chemistry in 1911.",
]
QUESTIONS = ["Who wrote the first program?", "Where does the Rhine end?"]


def test_every_variant_is_measured_against_float32(tiny_model_dir: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    report = run_cpu_options(
        str(tiny_model_dir), UniformWeighter(), TEXTS, QUESTIONS, tmp_path, rounds=1, log=str
    )
    assert torch.get_num_threads() == threads  # the study leaves the process as it found it
    rows = report["variants"]
    assert list(rows) == [v.name for v in VARIANTS]
    baseline = rows[VARIANTS[0].name]
    assert baseline["answer_speedup"] == 1.0 and baseline["step_speedup"] == 1.0
    assert baseline["same_answers"] == 1.0 and baseline["loss_difference"] == 0.0
    bf16 = rows["bfloat16, 1 thread"]
    assert 0.0 < bf16["loss_difference"] < 1.0  # rounding, not a different model
    assert rows["float32, static KV cache"]["step_seconds_per_document"] is None
    assert all(r["answer_seconds"] > 0 for r in rows.values())
    written = json.loads((tmp_path / "cpu-options.json").read_text())
    assert written["variants"].keys() == rows.keys()
    table = (tmp_path / "cpu-options.md").read_text()
    assert "| bfloat16, 2 documents per step |" in table
    assert (tmp_path / "cpu-options.png").stat().st_size > 0
