"""MAC on tiny random Llama / Qwen2 / GPT-2 bases: shapes, masking, injection, the bank, training."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from adaptation.answering import generate_answers, generate_batched
from adaptation.data import QA, Document, write_documents
from adaptation.lab.mac_training import QUICK, _prepare, batch_loss, train_mac
from adaptation.lab.world import WorldConfig, build_world
from adaptation.mac.aggregator import Aggregator, AggregatorConfig
from adaptation.mac.amortizer import EncoderConfig, tokenize
from adaptation.mac.bank import BankIndex, MemoryBank
from adaptation.mac.blocks import MaskedAttention
from adaptation.mac.injection import encode_prompts, prefix_logits, prompt_positions
from adaptation.mac.system import BANK, BankMismatch, MacSystem, networks_identity
from adaptation.modeling import load_base
from adaptation.prompts import qa_prompt
from service.cli import main
from tests.conftest import save_tiny, tiny_mac_system

DOCS = {
    "alda": "Alda Venn was born in Marrow Bay in 1961 and works for Quillon Works.",
    "selka": "The weather in Port Selka stayed mild, said 42 residents on Tuesday.",
    "bowl": "Super Bowl 50 was an American football game played on February 7, 2016.",
}
QUESTIONS = ["Where was Alda Venn born?", "When was Super Bowl 50 played?"]


def test_modulation_shape_per_family(tiny_family_dir: Path) -> None:
    system = tiny_mac_system(tiny_family_dir, num_tokens=5)
    d = system.base.config.get_text_config().hidden_size
    mods = system.modulate(list(DOCS.values()))
    assert mods.shape == (3, 5, d)
    assert torch.isfinite(mods).all()
    assert system.ingest("alda", DOCS["alda"]) and not system.ingest("alda", DOCS["alda"])
    assert system.bank.num_entries == 1 and system.bank.nbytes == 5 * d * 2
    prefix = system.prefix(QUESTIONS)
    shape = system.networks.config.prefix
    assert prefix is not None
    assert prefix.keys.shape == (shape.layers, 2, shape.kv_heads, 5, shape.head_dim)
    assert prefix.values.shape == prefix.keys.shape


def test_prefix_changes_outputs_only_when_memory_is_non_empty(tiny_family_dir: Path) -> None:
    system = tiny_mac_system(tiny_family_dir)
    base, tok = system.base, system.tokenizer
    assert system.prefix(QUESTIONS) is None
    assert system.answer(QUESTIONS, max_new_tokens=6) == generate_answers(
        base, tok, QUESTIONS, max_new_tokens=6
    )
    prompts = ["Alda Venn was born in", "Super Bowl"]
    assert system.complete(prompts, 6) == generate_batched(base, tok, prompts, max_new_tokens=6)
    ids, mask = encode_prompts(tok, [qa_prompt(tok, q) for q in QUESTIONS], "cpu")
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask)).logits
        assert torch.equal(prefix_logits(base, None, ids, mask), plain)
        system.ingest_many(list(DOCS.items()))
        # Question 0 has no memory (its prefix is masked out); question 1 reads one document.
        mixed = prefix_logits(base, system.prefix(QUESTIONS, [[], ["alda"]]), ids, mask)
        whole = prefix_logits(base, system.prefix(QUESTIONS), ids, mask)
    real = mask.bool()
    assert torch.allclose(mixed[0][real[0]], plain[0][real[0]], atol=1e-5)
    assert (mixed[1][real[1]] - plain[1][real[1]]).abs().max() > 1e-4
    assert (whole[real] - plain[real]).abs().max() > 1e-4
    assert system.answer(QUESTIONS, doc_ids=[[], []], max_new_tokens=6) == generate_answers(
        base, tok, QUESTIONS, max_new_tokens=6
    )


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_prefix_injection_passes_the_cache_by_its_current_name(tiny_family_dir: Path) -> None:
    system = tiny_mac_system(tiny_family_dir)
    system.ingest_many(list(DOCS.items()))
    assert len(system.answer(QUESTIONS, max_new_tokens=4)) == len(QUESTIONS)


def test_amortizer_ignores_padding(tiny_model_dir: Path) -> None:
    system = tiny_mac_system(tiny_model_dir)
    nets, enc_tok = system.networks, system.encoder_tokenizer
    short, long = DOCS["selka"][:20], DOCS["bowl"]
    ids, mask = tokenize(enc_tok, [short, long], 64)
    assert not mask[0].all(), "the short document must be padded in this batch"
    with torch.no_grad():
        alone = nets.modulate(*tokenize(enc_tok, [short], 64))[0]
        batched = nets.modulate(ids, mask)[0]
        garbage = ids.clone()
        garbage[~mask] = torch.randint(0, len(enc_tok), (int((~mask).sum()),))
        regarbled = nets.modulate(garbage, mask)[0]
    assert torch.allclose(alone, batched, atol=1e-5)
    assert torch.allclose(batched, regarbled, atol=1e-6)


def test_attention_gives_padded_keys_no_weight() -> None:
    torch.manual_seed(0)
    attn = MaskedAttention(16, 4)
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    changed = memory.clone()
    changed[1, 4:] = 1e3 * torch.randn(3, 16)
    assert torch.allclose(attn(x, memory, mask), attn(x, changed, mask), atol=1e-6)
    everything = torch.ones_like(mask)
    assert not torch.allclose(attn(x, memory, everything)[1], attn(x, changed, everything)[1])
    # A row with no real key stays finite (its output is ignored by callers).
    assert torch.isfinite(attn(x, memory, torch.zeros_like(mask))).all()


def aggregator(window: int = 4, chunk: int = 2) -> Aggregator:
    torch.manual_seed(0)
    question = EncoderConfig(
        vocab_size=50, out_width=16, width=16, layers=1, query_layers=1, num_tokens=3, max_length=16
    )
    return Aggregator(AggregatorConfig(width=16, window=window, chunk=chunk), question).eval()


@pytest.mark.parametrize("entries", [1, 4, 5, 11, 40])
def test_hierarchical_aggregation_folds_until_the_memory_fits(entries: int) -> None:
    agg = aggregator(window=4, chunk=2)
    seen: list[int] = []
    inner = agg._attend

    def spy(x: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        seen.append(keys.shape[1] // 3)  # entries and pseudo-entries are both 3 tokens
        return inner(x, keys, key_mask)

    queries = torch.randn(2, 3, 16)
    memory = torch.randn(1, entries, 3, 16)
    with torch.no_grad():
        per_question, _ = agg(queries, memory.expand(2, -1, -1, -1).contiguous())
        agg._attend = spy  # type: ignore[method-assign]
        out, present = agg(queries, memory)
    assert out.shape == (2, 3, 16) and present.all()
    assert torch.allclose(out, per_question, atol=1e-5), "shared and per-question layouts differ"
    # Every attention, at every level, sees at most `window` entries.
    assert seen and max(seen) <= 4
    levels = 0
    n = entries
    while n > 4:
        n, levels = -(-n // 2), levels + 1
    assert len(seen) == levels + 1


def test_aggregator_ignores_padded_entries_at_every_level() -> None:
    agg = aggregator(window=4, chunk=2)
    queries = torch.randn(2, 3, 16)
    memory = torch.randn(2, 11, 3, 16)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 5:] = False  # entry 5 shares a chunk with real entry 4
    changed = memory.clone()
    changed[1, 5:] = 100 * torch.randn(6, 3, 16)
    with torch.no_grad():
        a, present = agg(queries, memory, mask)
        b, _ = agg(queries, changed, mask)
        empty, absent = agg(queries, memory, torch.zeros_like(mask))
    assert present.all() and not absent.any()
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.isfinite(empty).all()


def test_bank_versions_drop_and_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    system = tiny_mac_system(tiny_model_dir)
    system.ingest_many(list(DOCS.items()))
    assert system.bank.version == 3 and system.bank.ids == list(DOCS)
    assert system.drop("selka") and not system.drop("selka")
    assert system.bank.version == 4 and system.bank.ids == ["alda", "bowl"]
    before = system.answer(QUESTIONS, max_new_tokens=6)
    tensor = system.bank.tensor().clone()
    system.save(tmp_path / "mac")

    model, tok = load_base(tiny_model_dir, device="cpu")
    again = MacSystem.load(tmp_path / "mac", model, tok)
    assert again.bank.ids == ["alda", "bowl"] and again.bank.version == 4
    assert torch.equal(again.bank.tensor(), tensor)
    assert again.bank.nbytes == system.bank.nbytes
    assert again.answer(QUESTIONS, max_new_tokens=6) == before
    again.ingest("selka", DOCS["selka"])
    again.save_bank(tmp_path / "mac")
    assert len(list((tmp_path / "mac" / "bank").glob("*.safetensors"))) == 1
    assert MemoryBank.load(tmp_path / "mac" / "bank").ids == ["alda", "bowl", "selka"]


def test_wrong_base_or_missing_dir_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    system = tiny_mac_system(tiny_model_dir)
    system.save(tmp_path / "mac")
    other, tok = load_base(save_tiny(tmp_path / "gpt2", "gpt2"), device="cpu")
    with pytest.raises(ValueError, match="trained for a base"):
        MacSystem.load(tmp_path / "mac", other, tok)
    with pytest.raises(FileNotFoundError, match="meta-train mac"):
        MacSystem.load(tmp_path / "nothing", other, tok)
    with pytest.raises(ValueError, match="shape"):
        system.bank.append("x", torch.zeros(3, 3))


def _meta_train_docs() -> list[Document]:
    """12 small knowledge-world articles with questions."""
    world = build_world(
        WorldConfig(
            pretrain_people=4,
            meta_train_people=12,
            meta_val_people=2,
            eval_people=2,
            retention_questions=2,
        )
    )
    return world["meta_train"][:12]


def test_quick_training_lowers_the_training_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    docs = _meta_train_docs()
    data = tmp_path / "train.jsonl"
    write_documents(data, docs)
    out = tmp_path / "mac"
    code = main(
        [
            "meta-train",
            "mac",
            "--base",
            str(tiny_model_dir),
            "--train",
            str(data),
            "--val",
            str(data),
            "--out",
            str(out),
            "--quick",
            "--epochs",
            "4",
            "--batch-docs",
            "4",
            "--eval-questions",
            "4",
            "--lr",
            "3e-3",
        ]
    )
    assert code == 0
    report = json.loads((out / "training.json").read_text())
    # --val is the training set, so the validation loss is the training loss.
    assert report["best_val_loss"] < report["val_loss_untrained"] - 0.05
    assert report["steps"] == 12
    assert None not in (
        report["f1_own_memory"],
        report["f1_batch_memory"],
        report["f1_full_memory"],
    )
    assert report["base"] == str(tiny_model_dir)
    model, tok = load_base(tiny_model_dir, device="cpu")
    system = MacSystem.load(out, model, tok)
    assert len(system.bank) == 0
    system.ingest("d", docs[0].text)
    assert len(system.answer(QUESTIONS, max_new_tokens=4)) == 2


def test_retention_training_teaches_a_memory_to_leave_unrelated_answers_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    docs = _meta_train_docs()
    system = tiny_mac_system(tiny_model_dir)
    pad = int(system.tokenizer.pad_token_id)
    batch = _prepare(docs[:4], system.tokenizer, system.networks.config)
    strangers = [d.qas[0] for d in _prepare(docs[4:8], system.tokenizer, system.networks.config)]
    with torch.no_grad():
        alone = batch_loss(system.networks, system.base, batch, pad)
        crowded = batch_loss(
            system.networks, system.base, batch, pad, distractors=alone.memory.flip(0)
        )
        watched = batch_loss(system.networks, system.base, batch, pad, strangers=strangers)
    assert float(alone.kl) == 0.0 and float(watched.kl) > 0.0
    assert float(watched.total) == pytest.approx(float(alone.total))
    assert not torch.isclose(crowded.qa, alone.qa)

    def final_kl(weight: float) -> float:
        config = dataclasses.replace(
            QUICK,
            epochs=100,
            max_steps=48,
            time_limit_s=None,
            distractors=8,
            retention_weight=weight,
            lr=3e-3,
        )
        report = train_mac(tiny_model_dir, docs, docs, tmp_path / f"mac{weight}", config, "cpu")
        return report.val_history[-1][2]

    assert final_kl(20.0) < 0.4 * final_kl(0.0)


def _keyword_embed(texts: Sequence[str]) -> torch.Tensor:
    """A stand-in for MiniLM: one axis per document's subject, so retrieval is known exactly."""
    subjects = ("Venn", "Selka", "Bowl")
    return torch.tensor([[float(s in t) + 1e-3 for s in subjects] for t in texts])


@pytest.mark.parametrize("question_encoder", ["own", "base"])
def test_base_encoder_trains_a_step_with_no_gradient_on_the_base(
    tiny_model_dir: Path, tmp_path: Path, question_encoder: str
) -> None:
    system = tiny_mac_system(
        tiny_model_dir, encoder="base", question_encoder=question_encoder, encoder_layer=1
    )
    networks, base = system.networks, system.base
    assert networks.config.amortizer.reads_base and not hasattr(networks.amortizer, "embed")
    assert networks.config.question.reads == question_encoder
    assert not any(p is q for p in networks.parameters() for q in base.parameters())
    docs = [Document(k, v, questions=(QA(QUESTIONS[0], ("Marrow Bay",)),)) for k, v in DOCS.items()]
    batch = _prepare(docs, system.tokenizer, networks.config)
    networks.train()
    # Reading a document gives even a trainable base no gradient...
    ids, mask = tokenize(system.tokenizer, list(DOCS.values()), 64)
    networks.modulate(ids, mask).square().sum().backward()
    assert all(p.grad is None for p in base.parameters())
    assert networks.amortizer.read[1].weight.grad.abs().sum() > 0
    # ...and a training step, the base frozen as meta-training freezes it, trains only MAC.
    networks.zero_grad(set_to_none=True)
    base.requires_grad_(False)
    batch_loss(networks, base, batch, int(system.tokenizer.pad_token_id), [0]).total.backward()
    assert all(p.grad is None for p in base.parameters())
    assert networks.amortizer.read[1].weight.grad.abs().sum() > 0
    assert networks.aggregator.question.head[1].weight.grad.abs().sum() > 0
    networks.eval()

    system.ingest_many(list(DOCS.items()))
    before = system.answer(QUESTIONS, max_new_tokens=4)
    system.save(tmp_path / "mac")
    model, tok = load_base(tiny_model_dir, device="cpu")
    again = MacSystem.load(tmp_path / "mac", model, tok)
    assert again.networks.config == networks.config
    assert torch.equal(again.modulate(list(DOCS.values())), system.modulate(list(DOCS.values())))
    assert again.answer(QUESTIONS, max_new_tokens=4) == before


def test_meta_train_mac_reads_with_the_base_for_a_step_budget(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    docs = [Document(k, v, questions=(QA(QUESTIONS[0], ("Marrow Bay",)),)) for k, v in DOCS.items()]
    write_documents(data, docs)
    out = tmp_path / "mac"
    flags = ["meta-train", "mac", "--base", str(tiny_model_dir), "--train", str(data)]
    flags += ["--val", str(data), "--out", str(out), "--quick", "--batch-docs", "2"]
    flags += ["--encoder", "base", "--encoder-layer", "1", "--steps", "1", "--eval-questions", "0"]
    assert main(flags) == 0
    assert json.loads((out / "training.json").read_text())["steps"] == 1
    config = json.loads((out / "mac_config.json").read_text())
    assert config["amortizer"]["reads"] == config["question"]["reads"] == "base"
    assert config["amortizer"]["base_layer"] == 1


def test_bank_keys_follow_their_entries(tmp_path: Path) -> None:
    bank = MemoryBank(2, 3, networks="abc")
    keys = _keyword_embed(list(DOCS.values()))
    for (doc_id, _), key in zip(DOCS.items(), keys):
        assert bank.append(doc_id, torch.full((2, 3), float(len(doc_id))), key)
    with pytest.raises(ValueError, match="retrieval key"):
        bank.append("nokey", torch.zeros(2, 3))
    assert bank.entry_nbytes == (2 * 3 + 3) * 2 and bank.nbytes == 3 * bank.entry_nbytes
    assert bank.search(_keyword_embed(["Bowl Venn"]), 2)[0] in (["bowl", "alda"], ["alda", "bowl"])
    assert bank.drop("alda")
    assert bank.search(_keyword_embed(["Venn"]), 1) != [["alda"]]
    bank.save(tmp_path / "bank")
    again = MemoryBank.load(tmp_path / "bank")
    assert again.networks == "abc" and again.ids == ["selka", "bowl"]
    assert again.search(_keyword_embed(["Selka", "Bowl"]), 1) == [["selka"], ["bowl"]]
    index = BankIndex.read(tmp_path / "bank")
    assert (index.entries, index.key_width, index.entry_nbytes) == (2, 3, bank.entry_nbytes)
    assert again.drop("selka") and again.drop("bowl")
    assert again.append("nokey", torch.zeros(2, 3))  # an emptied bank takes either kind


def test_top_k_aggregates_only_the_retrieved_entries(tiny_model_dir: Path) -> None:
    system = tiny_mac_system(tiny_model_dir)
    system.embed, system.top_k = _keyword_embed, 1
    system.ingest_many(list(DOCS.items()))
    assert system.bank.keyed
    retrieved = system.answer(QUESTIONS, max_new_tokens=6)
    assert retrieved == system.answer(QUESTIONS, doc_ids=[["alda"], ["bowl"]], max_new_tokens=6)
    system.top_k = 0
    assert system.answer(QUESTIONS, max_new_tokens=6) != retrieved


def test_a_similarity_floor_leaves_questions_about_nothing_in_the_bank_to_the_base(
    tiny_model_dir: Path,
) -> None:
    system = tiny_mac_system(tiny_model_dir)
    system.embed, system.min_similarity = _keyword_embed, 0.5
    system.ingest_many(list(DOCS.items()))
    assert system.bank.search(_keyword_embed(["Venn", "Paris"]), 3, 0.5) == [["alda"], []]
    stranger = "What is the capital of France?"
    gated = system.answer([QUESTIONS[0], stranger], max_new_tokens=6)
    assert gated[0] == system.answer(QUESTIONS[:1], doc_ids=[["alda"]], max_new_tokens=6)[0]
    plain = generate_answers(system.base, system.tokenizer, [stranger], max_new_tokens=6)
    assert gated[1] == plain[0]
    system.min_similarity = -1.0
    assert system.answer([stranger], max_new_tokens=6) != plain  # the whole bank speaks


def test_a_bank_of_other_networks_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    system = tiny_mac_system(tiny_model_dir)
    system.save(tmp_path / "mac")
    model, tok = load_base(tiny_model_dir, device="cpu")
    loaded = MacSystem.load(tmp_path / "mac", model, tok)
    assert loaded.networks_id == networks_identity(tmp_path / "mac")
    loaded.ingest("alda", DOCS["alda"])
    loaded.save_bank(tmp_path / "snap")
    assert MemoryBank.load(tmp_path / "snap" / BANK).networks == loaded.networks_id
    other = tiny_mac_system(tiny_model_dir, num_tokens=4, layers=2).save(tmp_path / "other")
    with pytest.raises(BankMismatch, match="written by MAC networks"):
        MacSystem(
            loaded.networks,
            model,
            tok,
            bank=MemoryBank.load(tmp_path / "snap" / BANK),
            networks_id=networks_identity(other),
        )
    with pytest.raises(BankMismatch, match="3 x"):
        MacSystem(loaded.networks, model, tok, bank=MemoryBank(3, 5))
