"""`uptake forget-check`: the figures' arithmetic, and (slow) the run on the demo model that
measures whether forgetting a document undoes what it taught and leaves the rest alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptation.data import QA, Document
from adaptation.lab.forget_check import (
    ForgetConfig,
    Phase,
    forget_figures,
    forget_table,
    run_forget_check,
    write_figures,
)
from adaptation.paths import demo_model_dir, demo_world_dir
from service.cli import main
from service.settings import Settings
from tests.servicekit import redis_for_tests


def _doc(name: str, *golds: str) -> Document:
    questions = tuple(QA(f"{name} question {i}?", (gold,)) for i, gold in enumerate(golds))
    return Document(id=name, text=f"{name} text.", questions=questions)


DOCS = [_doc("d0", "Hale", "1950"), _doc("d1", "Oss"), _doc("d2", "Selka")]


def test_figures_set_the_forgotten_document_against_the_others() -> None:
    phases = {
        "before_ingest": Phase([["Brill", "1901"], ["Oss"], ["Brill"]], 0),
        "after_ingest": Phase([["Hale", "1950"], ["Oss"], ["Selka"]], 2),
        "after_forget": Phase([["Brill", "1950"], ["Oss"], ["Port Selka"]], 3),
    }
    figures = forget_figures(DOCS, phases, forgotten=0)
    assert figures["versions"] == {"before_ingest": 0, "after_ingest": 2, "after_forget": 3}
    assert figures["forgotten"] == {
        "id": "d0",
        "questions": 2,
        "f1": {"before_ingest": 0.0, "after_ingest": 1.0, "after_forget": 0.5},
    }
    others = figures["others"]
    assert (others["documents"], others["questions"]) == (2, 2)
    assert others["mean_f1"]["before_ingest"] == 0.5 and others["mean_f1"]["after_ingest"] == 1.0
    assert others["mean_f1"]["after_forget"] == pytest.approx((1 + 2 / 3) / 2)
    assert others["answers_unchanged_by_forget"] == 0.5
    assert figures["per_document"][2]["answers"]["after_forget"] == ["Port Selka"]

    table = forget_table({**figures, "strategy": "uniform", "lr": 1e-3, "steps_per_doc": 3})
    assert "| forgotten d0 (2 questions) | 0.000 | 1.000 | 0.500 |" in table
    assert "unchanged by the forget: 50.0%" in table and "learned nothing" not in table
    same = Phase(phases["before_ingest"].answers, 1)
    unlearned = forget_figures(DOCS, {p: same for p in phases}, forgotten=0)
    assert "learned nothing" in forget_table(
        {**unlearned, "strategy": "uniform", "lr": 1e-3, "steps_per_doc": 3}
    )


def test_cli_needs_a_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.jsonl"
    assert main(["forget-check", "--model", str(tmp_path), "--data", str(missing)]) == 2
    assert "give --data" in capsys.readouterr().err


def test_cli_stops_at_a_strategy_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any process starts: camels without a weighting model, and a misspelt --strategy
    or UPTAKE_STRATEGY, each end in one line that says what to set."""
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    stream = tmp_path / "stream.jsonl"
    stream.write_text("")
    flags = ["forget-check", "--model", str(tmp_path), "--data", str(stream)]
    assert main([*flags, "--strategy", "camels"]) == 2
    assert "UPTAKE_WEIGHTER" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main([*flags, "--strategy", "camel"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("uptake forget-check: --strategy: ")
    monkeypatch.setenv("UPTAKE_STRATEGY", "camel")
    with pytest.raises(SystemExit) as stopped:
        main(flags)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("uptake forget-check: UPTAKE_STRATEGY: ") and "'camels'" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_forgetting_on_the_demo_model(tmp_path: Path) -> None:
    """Issue 6's forget test (figures printed; run with -s): the demo model learns a fact from
    one of the documents, forgetting that document takes the fact back to the base's answer,
    and the others' answers stay as they were (at least 80% identical, mean F1 within 0.05)."""
    model, stream = demo_model_dir(), demo_world_dir() / "eval_stream.jsonl"
    if not (model / "config.json").exists() or not stream.exists():
        pytest.skip("needs the demo model and world (`uptake world` and `uptake bootstrap`)")
    with redis_for_tests(tmp_path) as url:
        figures = run_forget_check(
            str(model), stream, ForgetConfig(), Settings(redis_url=url).child_env()
        )
    print(forget_table(figures))
    write_figures(figures, tmp_path / "forget.json")
    assert json.loads((tmp_path / "forget.json").read_text())["documents"] == 20
    versions = figures["versions"]
    assert versions["before_ingest"] == 0 < versions["after_ingest"] < versions["after_forget"]
    gone, others = figures["forgotten"]["f1"], figures["others"]["mean_f1"]
    assert gone["after_ingest"] > gone["before_ingest"]
    assert gone["after_forget"] <= gone["before_ingest"]
    assert abs(others["after_forget"] - others["after_ingest"]) <= 0.05
    assert figures["others"]["answers_unchanged_by_forget"] >= 0.8
