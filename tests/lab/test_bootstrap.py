"""`uptake bootstrap` builds the demo model and the learned parts every strategy and mode needs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from adaptation.lab import bootstrap
from adaptation.mac.system import MacSystem
from adaptation.modeling import load_base
from adaptation.paths import demo_mac_dir, demo_weighter_dir
from adaptation.prompts import ANSWER_END
from adaptation.weighting.camels import CamelsWeighter
from service.cli import main
from tests.conftest import one_padded_pass, tiny_model


def test_quick_bootstrap_builds_the_model_its_weighting_model_and_its_mac_networks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    assert main(["bootstrap", "--quick"]) == 0
    out = capsys.readouterr().out
    weighter_dir, mac_dir = demo_weighter_dir(quick=True), demo_mac_dir(quick=True)
    assert f"demo CaMeLS weighting model: {weighter_dir}" in out
    assert f"demo MAC networks: {mac_dir}" in out
    card = json.loads((tmp_path / "demo-quick" / "uptake_card.json").read_text())
    assert card["world"] == str((tmp_path / "world-quick").resolve())  # where they trained

    weighter = CamelsWeighter.load(weighter_dir)
    weights = weighter.char_weights("Orla Penn founded Tessel Yard in 1911.")
    assert weights.shape == (len("Orla Penn founded Tessel Yard in 1911."),)
    assert (weights >= 0).all()
    base, tokenizer = load_base(tmp_path / "demo-quick", device="cpu")
    mac = MacSystem.load(mac_dir, base, tokenizer)  # networks shaped for this base
    assert len(mac.bank) == 0  # trained networks, an empty memory
    assert not list(tmp_path.glob("*.tmp"))  # every part was renamed into place


def test_model_only_and_other_bases_skip_the_learned_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    assert main(["bootstrap", "--quick", "--model-only"]) == 0
    assert main(["bootstrap", "--quick", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "demo-quick" / "config.json").is_file()
    assert (tmp_path / "elsewhere" / "config.json").is_file()
    assert not demo_weighter_dir(quick=True).exists() and not demo_mac_dir(quick=True).exists()


def test_bootstrap_builds_only_what_is_missing_and_rebuild_renews_the_model_and_its_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorders stand in for the builders (the quick test above shows what each builds)."""
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    built: list[str] = []

    def model(out: Path, *args: object, **kwargs: object) -> Path:
        built.append("model")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "README.md").write_text("card")
        return out

    def part(name: str, where: Path) -> object:
        def build(model_dir: Path, quick: bool = False) -> Path:
            assert model_dir == tmp_path / "demo-quick" and quick
            built.append(name)
            shutil.rmtree(where, ignore_errors=True)  # as a build renamed into place does
            where.mkdir(parents=True)
            return where

        return build

    monkeypatch.setattr(bootstrap, "build_demo_model", model)
    weighter_dir, mac_dir = demo_weighter_dir(quick=True), demo_mac_dir(quick=True)
    monkeypatch.setattr(bootstrap, "build_demo_weighter", part("weighter", weighter_dir))
    monkeypatch.setattr(bootstrap, "build_demo_mac", part("mac", mac_dir))
    runs = [
        ([], ["model", "weighter", "mac"]),
        ([], []),
        (["--model-only", "--rebuild"], ["model"]),
        ([], ["weighter", "mac"]),  # trained for the model before: stale
        ([], []),
    ]
    for extra, expected in runs:
        built.clear()
        assert main(["bootstrap", "--quick", *extra]) == 0
        assert built == expected, extra
    weighter_dir.rmdir()
    built.clear()
    assert main(["bootstrap", "--quick"]) == 0
    assert built == ["weighter"]
    built.clear()
    assert main(["bootstrap", "--quick", "--rebuild"]) == 0
    assert built == ["model", "weighter", "mac"]


def test_reading_lessons_ask_about_fresh_newcomers_each_epoch_with_the_answer_in_context(
    quick_home: Path,
) -> None:
    spec = dataclasses.replace(bootstrap.SPECS["quick"], reading_people=6, epochs=3)
    tok = AutoTokenizer.from_pretrained(quick_home / "demo-quick")
    lessons = bootstrap._reading_lessons(spec, tok)
    assert len(lessons) == 3 and all(lessons)
    asked: list[set[str]] = []
    for epoch in lessons:
        questions = set()
        for ids, prompt_length in epoch:
            prompt = tok.decode(ids[:prompt_length])
            answer = tok.decode(ids[prompt_length:]).replace(ANSWER_END, "").strip()
            context, question = prompt.split("\nQuestion: ")
            assert context.startswith("Context: ") and answer in context
            questions.add(question)
        asked.append(questions)
    assert not asked[0] & asked[1] and not asked[1] & asked[2]  # a new share every epoch
    no_reading = bootstrap._reading_lessons(bootstrap.SPECS["demo"], tok)
    assert no_reading == [[] for _ in range(bootstrap.SPECS["demo"].epochs)]


def test_a_batch_split_into_passes_by_length_trains_as_one_pass() -> None:
    seqs = [
        ([5 + i % 7] * length, length // 3) for i, length in enumerate([20, 200, 24, 210, 18, 190])
    ]
    passes = bootstrap._passes(seqs)
    assert len(passes) > 1  # short and long apart: less padding
    assert sorted(s for p in passes for s in p) == sorted(seqs)

    def gradient(step: Callable[[torch.nn.Module], float]) -> tuple[float, torch.Tensor]:
        model = tiny_model("llama", vocab_size=32)
        loss = step(model)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters()])

    loss, grad = gradient(lambda m: one_padded_pass(m, seqs, 0))
    split_loss, split_grad = gradient(
        lambda m: bootstrap._train_step(m, seqs, 0, torch.device("cpu"))
    )
    assert split_loss == pytest.approx(loss, rel=1e-5)
    assert torch.allclose(split_grad, grad, rtol=1e-4, atol=1e-7)
