"""`uptake eval`'s seal with own self-edits: the base writes them through the learner, cached
under UPTAKE_HOME, or the supplied ones are learned."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from adaptation.data import QA, Document
from adaptation.lab.evaluation import EvalConfig, SealMethod
from service.cli import build_parser
from service.cli.lab import EVAL_OPTIONS
from service.cli.options import config_values

DOC = Document(
    "d1",
    "Alda Venn was born in Marrow Bay in 1961.",
    title="Alda Venn",
    questions=(QA("Where was Alda Venn born?", ("Marrow Bay",)),),
)
SUPPLIED = ("Alda Venn, an engineer, was born in Marrow Bay.",)


def _seal(model_dir: Path, best_of_k: int = 0, **cfg: object) -> SealMethod:
    config = EvalConfig(self_edit_tokens=12, **cfg)  # type: ignore[arg-type]
    return SealMethod(str(model_dir), config, lr=1e-3, seed=0, best_of_k=best_of_k)


def test_own_self_edits_are_written_once_and_cached(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    seal = _seal(tiny_model_dir, self_edits="own", self_edit_k=2)
    written = seal.generations(replace(DOC, self_edits=SUPPLIED), 2)
    assert len(written) == 2 and written != SUPPLIED, "own ignores what the document carries"
    assert len(list((tmp_path / "self_edits").rglob("*.json"))) == 1
    monkeypatch.setattr("adaptation.self_edit.sample_generations", None)  # no writing again
    assert _seal(tiny_model_dir, self_edits="own", self_edit_k=2).generations(DOC, 2) == written
    assert seal.ingest(DOC).applied


def test_supplied_by_default_where_a_document_carries_them(tiny_model_dir: Path) -> None:
    seal = _seal(tiny_model_dir, self_edit_cache=False)
    assert seal.generations(replace(DOC, self_edits=SUPPLIED), 2) == SUPPLIED
    assert len(seal.generations(DOC, 2)) == 1, "none supplied: the base writes its own"
    assert _seal(tiny_model_dir, self_edits="supplied").generations(DOC, 2) == ()


def test_seal_best_scores_own_candidates_on_the_bases_probes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    probe = QA("Who was born in Marrow Bay?", ("Alda Venn",))
    monkeypatch.setattr("adaptation.lab.evaluation.write_probes", lambda *a, **k: [probe])
    seal = _seal(tiny_model_dir, best_of_k=3, self_edits="own")
    assert seal.probes(DOC) == ([probe], "f1"), "never the gold questions"
    seal.ingest(DOC)
    (choice,) = seal.choices
    assert len(choice.probe) == 3 and choice.gold is not None and choice.scoring == "f1"
    assert 0 <= seal.summary()["chose_gold_best"] <= 1


def test_the_self_edit_flags_fill_the_eval_config() -> None:
    args = build_parser().parse_args(
        ["eval", "--data", "d", "--out", "o", "--self-edits", "own"]
        + ["--self-edit-prompt", "rewrite", "--self-edit-k", "2", "--no-self-edit-cache"]
    )
    cfg = EvalConfig(**config_values(args, EVAL_OPTIONS))
    assert (cfg.self_edits, cfg.self_edit_prompt, cfg.self_edit_k) == ("own", "rewrite", 2)
    assert cfg.self_edit_cache is False and cfg.self_edit_tokens == 128
    defaults = EvalConfig(
        **config_values(
            build_parser().parse_args(["eval", "--data", "d", "--out", "o"]), EVAL_OPTIONS
        )
    )
    assert defaults.self_edits is None and defaults.self_edit_prompt is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--data", "d", "--out", "o", "--self-edit-prompt", "x"])
