"""MAC memory scaling on the tiny MAC system: one row per size, only the held targets scored,
the hierarchy switched off and back, and the report's files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from adaptation.data import Document, all_questions, write_documents
from adaptation.lab.mac_scaling import (
    FILLER_PREFIX,
    ScalingConfig,
    filler_documents,
    flat_aggregation,
    run_scaling,
    write_scaling,
)
from adaptation.lab.world import WorldConfig, build_world
from adaptation.mac.system import MacSystem
from adaptation.modeling import load_base
from service.cli import main

SMALL = WorldConfig(
    pretrain_people=4, meta_train_people=2, meta_val_people=2, eval_people=6, retention_questions=4
)
SIZES = (2, 5, 12)
QUICK = ScalingConfig(
    sizes=SIZES, batch_size=3, max_new_tokens=3, rounds=2, single_questions=2, ingest_batch=4
)


@pytest.fixture
def system(tiny_model_dir: Path, tiny_mac_dir: Path) -> MacSystem:
    model, tok = load_base(tiny_model_dir, device="cpu")
    return MacSystem.load(tiny_mac_dir, model, tok)


@pytest.fixture(scope="module")
def targets() -> list[Document]:
    return build_world(SMALL)["eval_stream"][:4]


def _filler(targets: Sequence[Document], n: int = 12) -> list[Document]:
    return filler_documents(n, {d.title for d in targets if d.title}, SMALL)


def test_report_has_one_row_per_size_and_writes_its_files(
    system: MacSystem, targets: list[Document], tmp_path: Path
) -> None:
    own = system.bank
    window = system.networks.aggregator.config
    report = run_scaling(system, targets, _filler(targets), QUICK)
    assert system.bank is own and system.networks.aggregator.config == window
    rows = report["rows"]
    assert [r["entries"] for r in rows] == list(SIZES)
    for r in rows:
        assert 0.0 <= r["f1"] <= 1.0 and 0.0 <= r["flat"]["f1"] <= 1.0
        for key in ("answer_ms_median", "answer_ms_p90", "single_ms_median", "ingest_ms_per_doc"):
            assert r[key] > 0, key
        assert r["answer_ms_p90"] >= r["answer_ms_median"] > 0
        assert r["flat"]["answer_ms_median"] > 0
        assert r["bank_bytes"] == r["entries"] * own.entry_nbytes
    assert report["growth"]["entries"] == 6
    write_scaling(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["rows"] == rows
    table = (tmp_path / "out" / "scaling.md").read_text()
    assert table.count("\n| ") == 2 + len(SIZES) and "6×" in table
    assert (tmp_path / "out" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_beyond_the_memory_size_are_not_scored(
    system: MacSystem, targets: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: dict[int, set[str]] = {}
    answer = system.answer

    def spy(questions: Sequence[str], *args: object, **kwargs: object) -> list[str]:
        asked.setdefault(len(system.bank), set()).update(questions)
        return answer(questions, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(system, "answer", spy)
    rows = run_scaling(system, targets, _filler(targets), QUICK)["rows"]
    for n, row in zip(SIZES, rows, strict=True):
        held = {q.question for q in all_questions(targets[:n])}
        assert row["targets"] == min(n, len(targets))
        assert row["questions"] == len(all_questions(targets[:n]))
        assert asked[n] == held
    assert asked[2] < asked[5]


def test_flat_aggregation_attends_once_over_the_whole_bank(
    system: MacSystem, targets: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    system.ingest_many([(d.id, d.text) for d in _filler(targets)])
    aggregator = system.networks.aggregator
    widths: list[int] = []
    inner = aggregator._attend

    def spy(x: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        widths.append(keys.shape[1] // system.bank.num_tokens)
        return inner(x, keys, key_mask)

    monkeypatch.setattr(aggregator, "_attend", spy)
    question = [all_questions(targets)[0].question]
    hierarchical = system.prefix(question)
    assert len(widths) > 1 and max(widths) <= aggregator.config.window < 12
    widths.clear()
    with flat_aggregation(system):
        flat = system.prefix(question)
    assert widths == [12]
    assert hierarchical is not None and flat is not None
    assert not torch.allclose(hierarchical.keys, flat.keys)
    assert aggregator.config.window < 12


def test_filler_is_deterministic_new_people_with_their_own_ids(targets: list[Document]) -> None:
    names = {d.title for d in targets if d.title}
    filler = _filler(targets, 30)
    assert filler == _filler(targets, 30) and len(filler) == 30
    assert all(d.id.startswith(f"{FILLER_PREFIX}-") for d in filler)
    assert not names & {d.title for d in filler}
    skipped = filler[0].title
    assert skipped not in {d.title for d in filler_documents(30, {skipped}, SMALL)}


def test_too_little_filler_or_clashing_ids_are_errors(
    system: MacSystem, targets: list[Document]
) -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        run_scaling(system, targets, _filler(targets, 3), QUICK)
    with pytest.raises(ValueError, match="unique"):
        run_scaling(system, targets, [targets[0], *_filler(targets)], QUICK)
    with pytest.raises(ValueError, match="increase"):
        ScalingConfig(sizes=(5, 2))


def test_cli_runs_only_the_scaling_study(
    tiny_model_dir: Path, tiny_mac_dir: Path, targets: list[Document], tmp_path: Path
) -> None:
    data = tmp_path / "stream.jsonl"
    write_documents(data, targets)
    out = tmp_path / "scaling"
    flags = ["bench", "--mac-scaling", "--model", str(tiny_model_dir), "--data", str(data)]
    flags += ["--targets", "3", "--sizes", "2,4", "--out", str(out)]
    assert main(flags) == 2  # no --mac
    assert main([*flags, "--mac", str(tiny_mac_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md", "scaling.png"]
    report = json.loads((out / "scaling.json").read_text())
    assert [r["entries"] for r in report["rows"]] == [2, 4]
    assert "--mac-scaling" in report["command"]


def test_cli_takes_squad_style_data_and_fills_from_it_first(
    tiny_model_dir: Path, tiny_mac_dir: Path, targets: list[Document], tmp_path: Path
) -> None:
    squad = [
        {
            "title": d.title or d.id,
            "context": d.text,
            "questions": [
                {"question": q.question, "answers": list(q.answers)} for q in d.questions
            ],
        }
        for d in targets
    ]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(squad))
    out = tmp_path / "scaling"
    flags = ["bench", "--mac-scaling", "--mac", str(tiny_mac_dir), "--model", str(tiny_model_dir)]
    flags += ["--data", str(data), "--targets", "1", "--sizes", "2,6", "--out", str(out)]
    assert main(flags) == 0
    report = json.loads((out / "scaling.json").read_text())
    assert report["filler_from_data"] == len(targets) - 1  # then the world tops it up
    assert [r["entries"] for r in report["rows"]] == [2, 6]
