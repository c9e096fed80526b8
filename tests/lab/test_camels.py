"""CaMeLS: the weighting model, its projection across tokenizers, and meta-training on a tiny base."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptation.data import QA, Document, write_documents
from adaptation.lab.camels_training import (
    MetaLearner,
    MetaTrainConfig,
    build_learner,
    overlap_matrix,
    project_weights,
    sample_episodes,
)
from adaptation.lab.tokenizer import train_bpe_tokenizer
from adaptation.modeling import LoraSettings, attach_lora, load_base, lora_parameters
from adaptation.updater import OnlineUpdater, UpdateConfig
from adaptation.weighting import encode_weighted, make_weighter, project_to_tokens
from adaptation.weighting.base import WeightedText
from adaptation.weighting.camels import CamelsSpec, CamelsWeighter
from service.cli import main
from tests.conftest import tiny_tokenizer

SMALL = CamelsSpec(hidden=32, layers=2, heads=2, intermediate=64, head_hidden=32, max_length=64)
TEXT = "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works as an engineer."


def _documents(n: int, seed: int) -> list[Document]:
    rng = random.Random(seed)
    syllables = ["al", "da", "ven", "mar", "row", "qui", "lon", "sel", "ka", "bay", "tor", "ne"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(2)).capitalize()

    docs = []
    for i in range(n):
        name, place, year = f"{word()} {word()}", word(), str(rng.randint(1900, 2000))
        text = (
            f"{name} was born in {place} in {year}. The weather in {word()} stayed mild, "
            f"said {rng.randint(10, 99)} residents on Tuesday."
        )
        questions = (QA(f"Where was {name} born?", (place,)), QA(f"When was {name} born?", (year,)))
        docs.append(
            Document(id=f"d{seed}-{i}", text=text, questions=questions, meta={"entity": name})
        )
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("camels-data")
    write_documents(out / "train.jsonl", _documents(8, seed=1))
    write_documents(out / "val.jsonl", _documents(5, seed=2))
    return out


def _learner(base: Path, **overrides: object) -> MetaLearner:
    settings = {
        "episode_docs": 3,
        "inner_lr": 2.0,
        "outer_lr": 1e-2,
        "c_kl": 0.1,
        "lora_rank": 4,
        "lora_alpha": 8,
        "spec": SMALL,
    } | overrides
    return build_learner(base, MetaTrainConfig(**settings), device="cpu")


def _episode(learner: MetaLearner, seed: int = 0) -> tuple[list, object]:
    docs, passage = next(sample_episodes(_documents(6, seed=3), 3, random.Random(seed)))
    return [learner.prepare(d) for d in docs], learner.prepare(passage)


def _randomise_head(weighter: CamelsWeighter, seed: int = 0) -> None:
    """The untrained head weighs every token alike; spread it so a mix-up would show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        last = weighter.head[-1]
        last.weight.normal_(0.0, 2.0)
        last.bias.fill_(0.1)


def test_untrained_weighter_weighs_every_token_ln2_over_beta() -> None:
    weighter = CamelsWeighter(tiny_tokenizer(), SMALL)
    w = weighter.char_weights(TEXT)
    covered = w[w > 0]
    assert covered.size > len(TEXT) * 0.7
    assert np.allclose(covered, np.log(2.0) / 3.0, atol=1e-6)


def test_padding_gets_zero_and_does_not_change_real_tokens() -> None:
    weighter = CamelsWeighter(tiny_tokenizer(), SMALL)
    _randomise_head(weighter)
    ids, _ = weighter.encode(TEXT)
    alone = weighter.token_weights(torch.tensor([ids]))[0]
    n = len(ids)
    right = torch.zeros(1, n + 5, dtype=torch.long)
    right[0, :n] = torch.tensor(ids)
    right_mask = (torch.arange(n + 5) < n).long().unsqueeze(0)
    left = torch.roll(right, 5, dims=1)
    left_mask = torch.roll(right_mask, 5, dims=1)
    w_right = weighter.token_weights(right, right_mask)[0]
    w_left = weighter.token_weights(left, left_mask)[0]
    assert torch.all(w_right[n:] == 0) and torch.all(w_left[:5] == 0)
    assert torch.allclose(w_right[:n], alone, atol=1e-5)
    assert torch.allclose(w_left[5:], alone, atol=1e-5)
    assert alone.std() > 1e-3


def test_weights_project_correctly_across_tokenizers() -> None:
    weighter = CamelsWeighter(tiny_tokenizer(384), SMALL)
    _randomise_head(weighter)
    base_tok = train_bpe_tokenizer(
        ["a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 9"] * 5, vocab_size=270
    )
    spans = weighter.spans(TEXT)
    base = base_tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    base_offsets = [tuple(o) for o in base["offset_mapping"]]
    assert len(base_offsets) > len(spans) + 20, "the two tokenizations must really differ"

    chars = weighter.char_weights(TEXT)
    for s in spans:
        assert np.allclose(chars[s.start : s.end], s.weight), (
            "a token's characters share its weight"
        )

    expected = project_to_tokens(chars, base_offsets)
    ids, w_offsets = weighter.encode(TEXT)
    differentiable = project_weights(
        weighter.weights_for_batch([ids])[0], overlap_matrix(base_offsets, w_offsets, len(TEXT))
    )
    assert np.allclose(differentiable.detach().numpy(), expected, atol=1e-6)
    assert np.allclose(encode_weighted(TEXT, base_tok, weighter).weights.numpy(), expected)

    inside = 0
    for (b_start, b_end), got in zip(base_offsets, expected, strict=True):
        owner = [s for s in spans if s.start <= b_start and b_end <= s.end]
        if b_end > b_start and owner:
            inside += 1
            assert got == pytest.approx(owner[0].weight, abs=1e-6)
    assert inside > 20
    assert len({round(float(x), 4) for x in expected}) > 5, "weights must vary for this to test"


def test_save_load_round_trip_gives_identical_weights(tmp_path: Path) -> None:
    weighter = CamelsWeighter(tiny_tokenizer(), SMALL)
    _randomise_head(weighter, seed=1)
    card = {"base": "tiny", "validation": {"qa_nll": 1.5}}
    weighter.save(tmp_path / "w", card)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "card.json"):
        assert (tmp_path / "w" / name).is_file(), name
    loaded = CamelsWeighter.load(tmp_path / "w")
    assert loaded.spec == SMALL and loaded.card == card
    assert np.array_equal(loaded.char_weights(TEXT), weighter.char_weights(TEXT))
    by_name = make_weighter("camels", path=tmp_path / "w")
    assert by_name.name == "camels"
    assert np.array_equal(by_name.char_weights(TEXT), weighter.char_weights(TEXT))
    assert "qa_nll" in (tmp_path / "w" / "README.md").read_text()


def test_load_rejects_a_directory_that_is_not_a_weighting_model(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a CaMeLS weighting model"):
        CamelsWeighter.load(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="meta-train camels"):
        CamelsWeighter.load(tiny_model_dir / "missing")


def test_episodes_hold_distinct_entities_and_an_outside_passage() -> None:
    docs = _documents(6, seed=4)
    docs.append(
        Document(
            id="change",
            text="Update: a move.",
            questions=docs[0].questions,
            meta={"entity": docs[0].meta["entity"]},
        )
    )
    stream = sample_episodes(docs, 3, random.Random(0))
    for _ in range(10):
        episode, passage = next(stream)
        assert len(episode) == 3
        assert len({d.meta["entity"] for d in episode}) == 3
        assert passage.id not in {d.id for d in episode}
    with pytest.raises(ValueError, match="at least 8 different entities"):
        next(sample_episodes(docs, 8, random.Random(0)))


def test_gradients_reach_the_weighting_model_and_not_the_base(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    docs, passage = _episode(learner)
    start = learner.start()
    out = learner.outer_loss(docs, passage, start)
    learner.backward(out)

    base_params = list(learner.model.named_parameters())
    assert any("lora_" in n for n, _ in base_params)
    assert all(p.grad is None for _, p in base_params), "the base and its LoRA get no gradient"
    assert all(t.grad is None for t in start.theta.values()), "the starting LoRA weights get none"
    last = learner.weighter.head[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0

    learner.step()
    out = learner.outer_loss(docs, passage, learner.start())
    learner.backward(out)
    embed = learner.weighter.body.embed_tokens.weight.grad
    assert embed is not None and embed.abs().sum() > 0, (
        "past the zero-initialised head, the body learns"
    )
    assert all(p.grad is None for _, p in learner.model.named_parameters())


def test_one_meta_step_lowers_the_outer_loss_on_the_episode(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    docs, passage = _episode(learner)
    before = learner.outer_loss(docs, passage, learner.start())
    learner.backward(before)
    learner.step()
    after = learner.outer_loss(docs, passage, learner.start())
    assert after.mean_weight != pytest.approx(before.mean_weight)
    assert after.figures()["outer"] < before.figures()["outer"] - 1e-3
    theta_before = learner.start().theta
    assert all(torch.equal(theta_before[n], learner.theta_init[n]) for n in theta_before)


def test_a_non_finite_outer_gradient_is_dropped_not_applied(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    docs, passage = _episode(learner)
    before = {n: p.detach().clone() for n, p in learner.weighter.named_parameters()}
    learner.backward(learner.outer_loss(docs, passage, learner.start()))
    next(learner.weighter.parameters()).grad.fill_(float("nan"))
    learner.step()
    assert learner.skipped_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in learner.weighter.named_parameters())
    learner.backward(learner.outer_loss(docs, passage, learner.start()))
    learner.step()  # a finite one still trains
    assert learner.skipped_steps == 1
    assert not all(torch.equal(p, before[n]) for n, p in learner.weighter.named_parameters())


def test_the_adam_inner_step_is_the_online_updaters_step(tiny_model_dir: Path) -> None:
    """Meta-training with inner_optimizer="adam" must see the very update the worker applies:
    clipped gradient, AdamW, moments carried from one document to the next."""
    learner = _learner(tiny_model_dir, inner_optimizer="adam", inner_lr=1e-2)
    docs, _ = _episode(learner)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.rand(d.base_ids.shape, generator=gen) + 0.5 for d in docs]
    state = learner.inner_loop(docs, learner.start(), weights, create_graph=False)
    assert state.t == len(docs)

    model, _ = load_base(tiny_model_dir, device="cpu", dtype=torch.float32)
    twin = attach_lora(model, LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in lora_parameters(twin).items():
            p.copy_(learner.theta_init[name])
    updater = OnlineUpdater(twin, UpdateConfig(lr=1e-2, normalisation=learner.config.normalisation))
    for doc, w in zip(docs, weights, strict=True):
        assert updater.step([WeightedText(doc.base_ids, w)]).applied
    moved = 0
    for name, p in lora_parameters(twin).items():
        torch.testing.assert_close(state.theta[name], p.detach(), rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(p.detach(), learner.theta_init[name]))
    assert moved > 0


def test_meta_gradients_flow_through_a_carried_adam_state(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir, inner_optimizer="adam", inner_lr=1e-2)
    docs, passage = _episode(learner)
    carried = learner.outer_loss(docs, passage, learner.start(), create_graph=False).state
    assert carried.t == len(docs) and carried.m and carried.v
    before = learner.outer_loss(docs, passage, learner.start(carried))
    learner.backward(before)
    last = learner.weighter.head[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert all(t.grad is None for t in carried.theta.values())
    learner.step()
    after = learner.outer_loss(docs, passage, learner.start(carried))
    assert after.figures()["outer"] < before.figures()["outer"]


def test_inner_loop_carries_learning_into_the_lora(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    docs, passage = _episode(learner)
    unadapted = learner.unadapted_nll(docs)
    adapted = learner.outer_loss(docs, passage, learner.start())
    assert adapted.figures()["qa"] < unadapted, "the weighted updates must teach the base something"
    assert adapted.figures()["kl"] > 0


def test_meta_training_a_pretrained_body_moves_only_its_unfrozen_part(
    tiny_model_dir: Path,
) -> None:
    """Two outer steps (the zeroed last layer passes no gradient back until it has moved once):
    the head and the unfrozen layer and norm change, the embeddings and frozen layer do not."""
    learner = _learner(
        tiny_model_dir, body=str(tiny_model_dir), body_layers=2, freeze_layers=1, spec=SMALL
    )
    before = {n: p.detach().clone() for n, p in learner.weighter.named_parameters()}
    for seed in range(2):
        docs, passage = _episode(learner, seed)
        learner.backward(learner.outer_loss(docs, passage, learner.start()))
        learner.step()
    moved = {n for n, p in learner.weighter.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n in before if n.startswith(("body.embed_tokens.", "body.layers.0."))}
    assert not moved & frozen
    assert {"head.0.weight", "head.2.weight", "body.norm.weight"} <= moved
    assert any(n.startswith("body.layers.1.") for n in moved)
    with pytest.raises(ValueError, match="freeze_layers must be 0 to the body's 2 layers"):
        MetaTrainConfig(body=str(tiny_model_dir), body_layers=2, freeze_layers=3)
    with pytest.raises(ValueError, match="brings its own tokenizer"):
        build_learner(
            tiny_model_dir, MetaTrainConfig(body=str(tiny_model_dir)), tiny_tokenizer(), "cpu"
        )


def test_meta_train_cli_reads_several_files_into_a_pretrained_body(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """--train and --val take comma lists; --body starts from the base's first layers, and the
    card says which and what was frozen."""
    out = tmp_path / "weighter"
    train = f"{data_dir / 'train.jsonl'},{data_dir / 'val.jsonl'}"
    flags = ["--base", str(tiny_model_dir), "--train", train, "--val", str(data_dir / "val.jsonl")]
    body = ["--body", str(tiny_model_dir), "--body-layers", "1", "--freeze-layers", "1"]
    run = ["--quick", "--steps", "2", "--device", "cpu", "--out", str(out)]
    assert main(["meta-train", "camels", *flags, *body, *run]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["train"] == train.split(",") and card["trained_steps"] == 2
    assert card["body_from"] == f"{tiny_model_dir}, first 1 layers"
    assert card["frozen"] == "embeddings and the first 1 body layers"
    loaded = CamelsWeighter.load(out)
    assert loaded.body.config.num_hidden_layers == 1
    source = load_base(tiny_model_dir, device="cpu", dtype=torch.float32)[0].base_model
    assert torch.equal(loaded.body.embed_tokens.weight, source.embed_tokens.weight)


def test_meta_train_quick_cli_end_to_end(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "weighter"
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "meta-train",
        "camels",
        "--base",
        str(tiny_model_dir),
        "--train",
        str(data_dir / "train.jsonl"),
        "--val",
        str(data_dir / "val.jsonl"),
        "--out",
        str(out),
        "--quick",
        "--inner-lr",
        "1.0",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "meta-training camels" in done.stderr, "a progress bar is shown"
    card = json.loads((out / "card.json").read_text())
    assert card["base"] == str(tiny_model_dir) and card["train"] == [str(data_dir / "train.jsonl")]
    assert card["trained_steps"] == MetaTrainConfig.quick().steps
    assert card["seconds_per_episode"] > 0
    assert card["seconds"] <= 120, "--quick must finish within two minutes"
    for key in ("qa_nll", "kl", "outer", "unadapted_qa_nll", "uniform_weight_1_qa_nll"):
        assert np.isfinite(card["validation"][key]), key
    weights = CamelsWeighter.load(out).char_weights(TEXT)
    assert weights.shape == (len(TEXT),) and np.all(weights >= 0) and weights.max() > 0


def test_weights_cli_renders_colour_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weighter = CamelsWeighter(tiny_tokenizer(), SMALL)
    _randomise_head(weighter)
    weighter.save(tmp_path / "w")
    png = tmp_path / "strip.png"
    assert main(["weights", "--weighter", str(tmp_path / "w"), TEXT, "--png", str(png)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b[48;2;" in shown and "Venn" in shown and "tokens, weight min" in shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["weights", "--weighter", str(tmp_path / "w"), TEXT, "--table"]) == 0
    assert "Venn'" in capsys.readouterr().out


def test_cli_bad_input_is_a_clear_error(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def meta_train(data: str, *extra: str) -> int:
        args = ["meta-train", "camels", "--base", str(tiny_model_dir), "--train", data]
        return main([*args, "--val", data, "--out", str(tmp_path / "o"), *extra])

    assert meta_train(str(tmp_path / "none.jsonl"), "--quick") == 2
    assert "no dataset at" in capsys.readouterr().err
    assert meta_train("x", "--episode-docs", "0") == 2
    assert "episode_docs must be at least 1" in capsys.readouterr().err
    assert main(["weights", "--weighter", str(tmp_path / "nowhere"), "text"]) == 2
    assert "no weighting model" in capsys.readouterr().err
