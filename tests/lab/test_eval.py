"""The evaluation harness end to end on the quick demo model (it knows little; the plumbing is
what is tested here). The learning benchmark itself is marked slow."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from adaptation.answering import generate_answers
from adaptation.data import QA, Document, all_questions, read_documents, write_documents
from adaptation.lab.evaluation import (
    Baseline,
    BaseMethod,
    EvalConfig,
    EvalProtocol,
    Held,
    LoraMethod,
    MacMethod,
    MacRagMethod,
    Run,
    SealMethod,
    choose_setting,
    run_eval,
    run_method,
)
from adaptation.learner import IngestResult, LearnSettings
from adaptation.metrics import score
from adaptation.modeling import LoraSettings
from adaptation.trust import source_tag
from adaptation.weighting import make_weighter
from tests.conftest import RecordingWeighter

SQUAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "squad_v1.1_dev.json"


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
    return [p.detach().clone() for p in method.learner.updater.params]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_eval_methods_scale_by_trust_and_tag_sources(quick_home: Path) -> None:
    doc = read_documents(quick_home / "world-quick" / "eval_stream.jsonl", 1)[0]
    assert doc.source == "world"
    cfg = EvalConfig(learning=LearnSettings(tag_salt="s"))
    weighter = RecordingWeighter()
    model = str(quick_home / "demo-quick")
    for method in (LoraMethod(model, weighter, cfg, 1e-2, 0), SealMethod(model, cfg, 1e-2, 0)):
        start = _adapter(method)
        assert "not learned" in str(method.ingest(doc, 0.0).note)
        assert _same(start, _adapter(method)), "trust 0: the document is not learned"
        assert method.ingest(doc, 1.0).applied
        assert not _same(start, _adapter(method))
    assert weighter.texts == [f"{source_tag('world', 's')} {doc.text}"]


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
    assert len(full.learner.updater.params) == len(weights)
    assert sum(p.numel() for p in weights) > sum(p.numel() for p in lora.learner.updater.params)
    assert full.memory_bytes() == sum(p.numel() * p.element_size() for p in weights)
    start = _adapter(full)
    full.ingest(doc)
    moved = [not torch.equal(a, b) for a, b in zip(start, _adapter(full), strict=True)]
    assert sum(moved) > len(moved) // 2, "a step moves the base's own weights, not an adapter"


class StartRecording(LoraMethod):
    """Remembers the trained weights each document starts from."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.starts: list[list[torch.Tensor]] = []

    def ingest(self, doc: Document, trust: float = 1.0) -> IngestResult:
        self.starts.append(_adapter(self))
        return super().ingest(doc, trust)


FACTS = [
    Document(
        "a",
        "Alda Venn was born in Marrow Bay.",
        questions=(QA("Where was Alda Venn born?", ("Marrow Bay",)),),
    ),
    Document(
        "b",
        "Oda Lind keeps goats in Hale.",
        questions=(QA("Where does Oda Lind keep goats?", ("Hale",)),),
    ),
    Document(
        "c",
        "Ivo Brand works for Quillon Works.",
        questions=(QA("Who employs Ivo Brand?", ("Quillon Works",)),),
    ),
]


@pytest.mark.parametrize("protocol", ["single", "stream"])
def test_the_single_protocol_starts_every_document_from_the_same_adapter(
    tiny_model_dir: Path, protocol: EvalProtocol
) -> None:
    cfg = EvalConfig(protocol=protocol, lora=LoraSettings(rank=4, alpha=8), device="cpu")
    method = StartRecording(str(tiny_model_dir), make_weighter("uniform"), cfg, 1e-2, 0)
    base = Baseline.measure(BaseMethod(str(tiny_model_dir), cfg), FACTS, Held())
    result = run_method(method, base, cfg, Run("uniform", 0, 1e-2, 1, checkpoints=3))
    first, *later = method.starts
    single = protocol == "single"
    assert [_same(first, s) for s in later] == [single, single]
    # The optimizer is reset with the adapter: the last document's step is the only one counted.
    assert method.learner.updater.steps_applied == (1 if single else 3)
    assert result.after["n"] == 3 and [n for n, _ in result.curve] == [0, 1, 2, 3]
    if single:
        per_doc = [s["f1"] for s in base.per_doc if s is not None]
        assert result.before["f1"] == pytest.approx(sum(per_doc) / 3)


class ContextRecording(BaseMethod):
    """The base, remembering what each round of answers was given as context."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.contexts: list[Sequence[str | None] | None] = []

    def answer(
        self, questions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[str]:
        self.contexts.append(contexts)
        return super().answer(questions, contexts)


def test_reading_asks_each_held_out_question_with_its_own_passage(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    passages = [
        replace(
            FACTS[0],
            questions=(*FACTS[0].questions, QA("Who was born in Marrow Bay?", ("Alda Venn",))),
        ),
        FACTS[1],
    ]
    write_documents(tmp_path / "reading.jsonl", passages)
    write_documents(tmp_path / "retention.jsonl", [FACTS[2]])
    held = Held.read(tmp_path / "retention.jsonl", tmp_path / "reading.jsonl")
    method = ContextRecording(str(tiny_model_dir), EvalConfig(device="cpu"))
    retention, reading = held.score(method)
    assert method.contexts == [None, [passages[0].text, passages[0].text, passages[1].text]]
    qas = all_questions(passages)
    answers = generate_answers(
        method.model,
        method.tokenizer,
        [q.question for q in qas],
        contexts=[passages[0].text, passages[0].text, passages[1].text],
        max_new_tokens=32,
    )
    assert reading == score(answers, [q.answers for q in qas]) and retention["n"] == 1


def test_single_protocol_report_with_reading(quick_home: Path, tmp_path: Path) -> None:
    world = quick_home / "world-quick"
    write_documents(
        tmp_path / "reading.jsonl", read_documents(world / "pretrain_heldout_qa.jsonl", 2)
    )
    cfg = EvalConfig(
        strategies=("uniform", "seal"),
        protocol="single",
        limit=3,
        checkpoints=1,
        learning=LearnSettings(epochs=2),
    )
    report = run_eval(
        world / "eval_stream.jsonl",
        quick_home / "demo-quick",
        tmp_path / "out",
        cfg,
        reading=tmp_path / "reading.jsonl",
        log=lambda _: None,
    )
    assert report["protocol"] == "single" and report["reading_questions"] > 0
    for row in report["strategies"]:
        assert row["curve"][-1][0] == 3 and "mean" in row["uptake_recall"]
        assert row["answer_ms"] > 0  # timed on the documents' own questions
    for run in report["runs"]:  # the quick model reads nothing, so the ratio itself is NaN
        assert run["reading_after"]["n"] == report["reading_questions"]
        assert not math.isnan(run["reading_after"]["f1"]) and "recall" in run["after"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Protocol single" in md and "before its reset" in md and "| seal |" in md
    assert "uptake recall" in md and "| reading |" in md
    with pytest.raises(ValueError, match="stream protocol"):
        run_eval(
            world / "eval_stream.jsonl",
            quick_home / "demo-quick",
            tmp_path / "out",
            replace(cfg, retention_matrix=True),
            log=lambda _: None,
        )


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


def test_the_similarity_floor_gates_mac_in_its_bank_and_mac_rag_in_its_own_index(
    tiny_model_dir: Path, tiny_mac_dir: Path
) -> None:
    cfg = EvalConfig(mac_path=str(tiny_mac_dir), min_similarity=0.3, max_new_tokens=6)
    docs = [
        Document("alda", "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works."),
        Document("bowl", "Super Bowl 50 was an American football game played in 2016."),
    ]
    stranger = ["What is the boiling point of water at sea level?"]
    mac, mac_rag = MacMethod(str(tiny_model_dir), cfg), MacRagMethod(str(tiny_model_dir), cfg)
    for method in (mac, mac_rag):
        for doc in docs:
            method.ingest(doc)
    plain = generate_answers(mac.model, mac.tokenizer, stranger, max_new_tokens=6)
    assert mac.system.bank.keyed and mac.system.min_similarity == 0.3
    # mac+rag names each question's documents from its own index: its bank keeps no keys.
    assert not mac_rag.system.bank.keyed and len(mac_rag.retriever) == 2
    assert mac.answer(stranger) == mac_rag.answer(stranger) == plain
