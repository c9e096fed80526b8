"""`uptake trust` and `uptake world --conflicts` end to end on the quick demo model (the plumbing
and the direction of the effect; the figures themselves come from the demo model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptation.data import read_documents
from adaptation.lab.conflicts import (
    ConflictConfig,
    build_conflicts,
    conflict_items,
    fresh_world,
    trusted_win_rate,
)
from adaptation.lab.evaluation import EvalConfig, LoraMethod
from adaptation.lab.trust_eval import TrustConfig, forgetting_run, run_trust
from adaptation.lab.world import WorldConfig
from adaptation.weighting import make_weighter


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "UPTAKE_HOME": str(home)},
        timeout=300,
    )


def test_trust_report_and_zero_trust_learns_nothing(quick_home: Path, tmp_path: Path) -> None:
    cfg = TrustConfig(
        seeds=(0,),
        people=8,
        trusted=0.0,
        distrusted=0.0,
        lr=1e-2,
        iml_people=2,
        iml_new_people=2,
        iml_epochs=1,
        forget_items=2,
        forget_warm=1,
        forget_after=(0, 2),
    )
    report = run_trust(quick_home / "demo-quick", tmp_path, cfg, log=lambda _: None)
    run = report["explicit"][0]
    assert run["contested"] == 4
    assert run["trusted"]["win_rate"] == run["before_win_rate"], "trust 0: nothing is learned"
    assert run["trusted"]["uncontested"] == run["before"]
    assert run["equal"]["uncontested"] != run["before"], "with trust 1 the stream is learned"
    assert {r["tags"] for r in report["learned"]} == {True, False}
    cases = {(r["lr"], r["steps"], r["warm"]) for r in report["forgetting"]}
    assert cases == {(1e-2, 2, 0), (1e-2, 2, 1), (3e-3, 4, 0), (3e-3, 4, 1)}
    md = (tmp_path / "trust.md").read_text()
    assert "| equal (1.0 / 1.0) |" in md and "| tagged |" in md
    assert "| lr 0.003 × 4 | after 1 articles |" in md
    assert (tmp_path / "trust.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "trust.json").read_text())["summary"]["win_rate_trusted"]


def test_forgetting_starts_every_fact_from_the_same_adapter(quick_home: Path) -> None:
    """With a learning rate too small to move anything, the win after any number of articles is
    the base's on the same facts: each fact counts once, and the warm-up and later articles come
    from the uncontested ones."""
    cfg = TrustConfig(people=12, forget_items=6, forget_warm=2, forget_after=(0, 3))
    model = str(quick_home / "demo-quick")
    run = forgetting_run(model, cfg, seed=0, lr=1e-12, steps=1, warm=2)
    items = conflict_items(build_conflicts(fresh_world(WorldConfig()), ConflictConfig(people=12)))
    base = LoraMethod(model, make_weighter("uniform"), EvalConfig(), 1e-12, 0)
    expected = trusted_win_rate(base.model, base.tokenizer, items[:6])
    assert run["win_before"] == pytest.approx(expected)
    assert run["win_after"] == pytest.approx({0: expected, 3: expected})
    with pytest.raises(ValueError, match="cannot warm 5 and follow with 3"):
        forgetting_run(model, cfg, seed=0, lr=1e-3, steps=1, warm=5)


def test_trust_cli_rejects_a_weight_outside_0_1(tmp_path: Path) -> None:
    out = _cli("trust", "--out", str(tmp_path), "--distrusted", "1.5", home=tmp_path)
    assert out.returncode == 2
    assert "--distrusted must be in [0, 1]" in out.stderr


def test_trust_cli_rejects_too_few_people_before_running_anything(tmp_path: Path) -> None:
    out = _cli("trust", "--out", str(tmp_path / "runs"), "--people", "40", home=tmp_path)
    assert out.returncode == 2
    assert "40 people give 20 uncontested articles" in out.stderr
    assert "use at least 100 people" in out.stderr
    assert not (tmp_path / "demo").exists() and not (tmp_path / "runs").exists()


def test_eval_cli_rejects_a_malformed_trust(tmp_path: Path) -> None:
    out = _cli("eval", "--data", "x", "--out", str(tmp_path), "--trust", "web", home=tmp_path)
    assert out.returncode == 2 and "expected SOURCE=WEIGHT" in out.stderr
    out = _cli("eval", "--data", "x", "--out", str(tmp_path), "--trust", "web=2", home=tmp_path)
    assert out.returncode == 2 and "must be in [0, 1]" in out.stderr


def test_world_conflicts_are_strangers_with_known_places(tmp_path: Path) -> None:
    out = _cli("world", "--out", str(tmp_path), "--conflicts", "6", home=tmp_path)
    assert out.returncode == 0, out.stderr
    docs = read_documents(tmp_path / "conflicts.jsonl")
    contested = [d for d in docs if d.meta["conflict"]]
    assert len(contested) == 2 * 3 and {d.source for d in docs} == {"reliable", "unreliable"}
    known = {d.title for d in read_documents(tmp_path / "pretrain.jsonl")}
    known |= {d.title for d in read_documents(tmp_path / "eval_stream.jsonl")}
    assert not {d.title for d in docs} & known, "conflict people are new to the world's model"
    text = (tmp_path / "pretrain.jsonl").read_text()
    names = {v for d in contested for v in (d.meta["reliable_value"], d.meta["unreliable_value"])}
    assert all(v in text for v in names if not v.isdigit()), "values the model has seen"
