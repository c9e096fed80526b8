"""The evaluation harness end to end on the quick demo model (it knows little; the plumbing is
what is tested here). The learning benchmark itself is marked slow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptation.data import read_documents
from adaptation.evaluation import EvalConfig, LoraMethod, SealMethod, choose_setting, run_eval
from adaptation.trust import source_tag
from adaptation.weighting import make_weighter

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad_v1.1_dev.json"


def test_quick_bootstrap_is_a_standard_hf_directory(quick_home: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = quick_home / "demo-quick"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "llama"
    assert (model_dir / "model.safetensors").exists()
    card = json.loads((model_dir / "uptake_card.json").read_text())
    assert set(card["figures"]) == {
        "retention_qa",
        "heldout_extraction_qa",
        "eval_stream_before",
        "eval_stream_in_context",
    }
    assert tok.decode(tok("Question: hi")["input_ids"]) == "Question: hi"


def test_eval_writes_report_table_and_plot(quick_home: Path, tmp_path: Path) -> None:
    world = quick_home / "world-quick"
    cfg = EvalConfig(
        strategies=("uniform", "salient", "tfidf", "seal", "seal-best", "rag"),
        limit=4,
        checkpoints=2,
        sweep_lrs=(1e-3, 3e-3),
        sweep_steps=(1, 2),
        retention_matrix=True,
    )
    report = run_eval(
        world / "eval_stream.jsonl",
        quick_home / "demo-quick",
        tmp_path,
        cfg,
        val_data=world / "meta_val.jsonl",
        log=lambda _: None,
    )
    assert [r["strategy"] for r in report["strategies"]] == [
        "uniform",
        "salient",
        "tfidf",
        "seal",
        "seal-best",
        "rag",
    ]
    assert set(report["sweep"]) == {"uniform", "salient", "tfidf", "seal", "seal-best"}
    assert {(r["lr"], r["steps"]) for r in report["sweep"]["uniform"]} == {
        (1e-3, 1),
        (1e-3, 2),
        (3e-3, 1),
        (3e-3, 2),
    }
    for row in report["strategies"]:
        assert row["curve"][0][0] == 0 and row["curve"][-1][0] == 4
        assert row["seconds_per_doc"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "| uniform |" in md and "| rag |" in md and "retention" in md
    assert (tmp_path / "uptake.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report.json").read_text())["questions"] > 0
    grid = report["strategies"][0]["matrix"]
    assert len(grid) == 4 and all(len(row) == 4 for row in grid)
    for i, row in enumerate(grid):
        assert all(v is None for v in row[:i]), "R[i][j] exists only once document i is read"
        assert all(v is not None for v in row[i:])
    assert "backward_transfer" in report["strategies"][0]["matrix_summary"]
    assert (tmp_path / "retention_matrix.png").read_bytes()[:4] == b"\x89PNG"
    best = next(r for r in report["strategies"] if r["strategy"] == "seal-best")["summary"]
    assert best["candidates"]["mean"] == 3 * 4, "3 paraphrased candidates for each of 4 articles"
    assert 0 <= best["chose_gold_best"]["mean"] <= 1 and best["chance"]["mean"] == 1 / 3
    assert "## Best-of-k self-edits" in md


def _adapter(method: LoraMethod) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method.updater.params]


def test_eval_methods_scale_by_trust_and_tag_sources(quick_home: Path) -> None:
    doc = read_documents(quick_home / "world-quick" / "eval_stream.jsonl", 1)[0]
    assert doc.source == "world"
    cfg = EvalConfig(trust={"world": 0.0}, tag_salt="s")
    for method in (
        LoraMethod(str(quick_home / "demo-quick"), make_weighter("uniform"), cfg, 1e-2, 0),
        SealMethod(str(quick_home / "demo-quick"), cfg, 1e-2, 0),
    ):
        start = _adapter(method)
        method.ingest(doc)
        assert all(torch.equal(a, b) for a, b in zip(start, _adapter(method), strict=True)), (
            "trust 0: the document is not learned"
        )
        method.trust.set("world", 1.0)
        method.ingest(doc)
        assert not all(torch.equal(a, b) for a, b in zip(start, _adapter(method), strict=True))
    assert method.training_text("x y", "world") == f"{source_tag('world', 's')} x y"
    assert method.training_text("x y", None) == "x y"


def test_full_finetune_trains_every_weight_of_the_base(quick_home: Path) -> None:
    doc = read_documents(quick_home / "world-quick" / "eval_stream.jsonl", 1)[0]
    lora = LoraMethod(
        str(quick_home / "demo-quick"), make_weighter("uniform"), EvalConfig(), 1e-3, 0
    )
    full = LoraMethod(
        str(quick_home / "demo-quick"),
        make_weighter("uniform"),
        EvalConfig(full_finetune=True),
        1e-3,
        0,
    )
    weights = list(full.model.parameters())
    assert len(full.updater.params) == len(weights)
    assert sum(p.numel() for p in weights) > sum(p.numel() for p in lora.updater.params)
    assert full.memory_bytes() == sum(p.numel() * p.element_size() for p in weights)
    start = _adapter(full)
    full.ingest(doc)
    moved = [not torch.equal(a, b) for a, b in zip(start, _adapter(full), strict=True)]
    assert sum(moved) > len(moved) // 2, "a step moves the base's own weights, not an adapter"


def test_choose_setting_respects_the_retention_floor() -> None:
    rows = [
        {"lr": 1e-4, "uptake_f1": 0.01, "retention": 0.99},
        {"lr": 1e-3, "uptake_f1": 0.08, "retention": 0.95},
        {"lr": 1e-2, "uptake_f1": 0.20, "retention": 0.50},
    ]
    assert choose_setting(rows, 0.9)["lr"] == 1e-3
    assert choose_setting(rows, 0.999)["lr"] == 1e-4


def test_unknown_strategy_is_a_clear_error(quick_home: Path, tmp_path: Path) -> None:
    world = quick_home / "world-quick"
    with pytest.raises(ValueError, match="unknown strategy 'magic'"):
        run_eval(
            world / "eval_stream.jsonl",
            quick_home / "demo-quick",
            tmp_path,
            EvalConfig(strategies=("magic",), limit=2),
            log=lambda _: None,
        )


@pytest.mark.skipif(not SQUAD.exists(), reason="shared/data is not beside the checkout")
def test_eval_cli_reads_squad(quick_home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "UPTAKE_HOME": str(quick_home)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "eval",
            "--data",
            str(SQUAD),
            "--limit",
            "2",
            "--model",
            str(quick_home / "demo-quick"),
            "--strategies",
            "uniform",
            "--checkpoints",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| uniform |" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["questions"] >= 2 and report["retention_questions"] == 0
