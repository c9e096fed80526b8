"""The demo model: a small Llama pretrained here on the knowledge world, so no hub is needed.

It learns the world's language, its pretrain entities, and the QA format, including answering
about entities it only read about (extraction): without that, no online update could ever show
up as an answer. Its learned companions, a CaMeLS weighting model and MAC networks, are
meta-trained for it on the world's meta-train stream, so every strategy and mode runs out of the
box.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from adaptation.answering import generate_answers
from adaptation.data import QA, Document, all_questions, read_documents
from adaptation.lab.tokenizer import train_bpe_tokenizer
from adaptation.lab.world import WorldConfig, newcomers, write_world
from adaptation.metrics import score
from adaptation.modeling import default_device
from adaptation.paths import (
    built_in_place,
    demo_mac_dir,
    demo_model_dir,
    demo_weighter_dir,
    demo_world_dir,
)
from adaptation.prompts import IGNORE, answer_batch, qa_tokens


@dataclass(frozen=True)
class DemoSpec:
    """Model size and training budget. `variant` bases differ in size and tokenizer, for
    showing that a weighting model transfers across bases.

    `reading_people`: newcomers (people no split mentions) whose articles the model only ever
    sees in its context, with questions about them; a fresh share of them each epoch, so the
    answer can be read but never memorised. The demo base has none and cannot read its context.
    """

    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 768
    epochs: int = 16
    lr: float = 1e-3
    doc_batch: int = 16
    qa_batch: int = 64
    max_len: int = 256
    world_people: int | None = None
    context_share: float = 0.3
    reading_people: int = 0
    monitor_every: int = 0
    seed: int = 0


SHORT_SEQ = 64
PASS_COST_TOKENS = 128

# The demo asks half its questions in context, the share that taught it most closed-book
# extraction; the variant and the reader keep the share they were built and evaluated with
# (docs/results/demo-spec.md).
SPECS: dict[str, DemoSpec] = {
    "demo": DemoSpec(context_share=0.5),
    "variant": DemoSpec(
        vocab_size=3000, hidden=192, layers=5, heads=6, intermediate=512, epochs=14
    ),
    "reader": DemoSpec(reading_people=2400),
    "quick": DemoSpec(
        vocab_size=1024,
        hidden=64,
        layers=2,
        heads=4,
        intermediate=128,
        epochs=3,
        lr=5e-3,
        world_people=60,
    ),
}


def _encode_docs(
    docs: list[Document], tok: PreTrainedTokenizerBase, max_len: int
) -> list[list[int]]:
    eos = tok.eos_token_id
    return [tok(d.text, add_special_tokens=False)["input_ids"][: max_len - 1] + [eos] for d in docs]


def _encode_qa(
    docs: list[Document], tok: PreTrainedTokenizerBase, rng: random.Random, context_share: float
) -> list[tuple[list[int], int]]:
    """(ids, prompt_length): the loss is on the answer only.

    A share of the questions is also asked with the source document and one other in context,
    so the same model can serve the retrieval (RAG) modes.
    """
    out = []
    texts = [d.text for d in docs]
    for doc in docs:
        for q in doc.questions:
            out.append(qa_tokens(tok, q.question, q.answers[0]))
            if rng.random() < context_share:
                out.append(_asked_in_context(tok, q, doc, texts, rng))
    return out


def _asked_in_context(
    tok: PreTrainedTokenizerBase, q: QA, doc: Document, texts: list[str], rng: random.Random
) -> tuple[list[int], int]:
    """The question with its source document and one other in context, in random order."""
    pair = [doc.text, rng.choice(texts)]
    rng.shuffle(pair)
    return qa_tokens(tok, q.question, q.answers[0], "\n".join(pair))


def _reading_lessons(
    spec: DemoSpec, tok: PreTrainedTokenizerBase
) -> list[list[tuple[list[int], int]]]:
    """Per epoch, every question about that epoch's share of the reading newcomers, asked in
    context: the answer is in the context and nowhere in the model, so it must read."""
    if not spec.reading_people:
        return [[] for _ in range(spec.epochs)]
    rng = random.Random(spec.seed + 2)
    docs = newcomers(_world_config(spec), spec.reading_people, "read")
    texts = [d.text for d in docs]
    people: dict[str, list[Document]] = {}
    for d in docs:
        people.setdefault(str(d.meta["entity"]), []).append(d)
    names = list(people)
    share = math.ceil(len(names) / spec.epochs)
    return [
        [
            _asked_in_context(tok, q, doc, texts, rng)
            for name in names[epoch * share : (epoch + 1) * share]
            for doc in people[name]
            for q in doc.questions
        ]
        for epoch in range(spec.epochs)
    ]


def _world_config(spec: DemoSpec) -> WorldConfig:
    cfg = WorldConfig(seed=spec.seed)
    if spec.world_people:
        cfg = cfg.replace(
            pretrain_people=spec.world_people,
            meta_train_people=24,
            meta_val_people=8,
            eval_people=20,
            retention_questions=40,
        )
    return cfg


def _make_batches(
    docs: list[list[int]], qa: list[tuple[list[int], int]], spec: DemoSpec, rng: random.Random
) -> list[list[tuple[list[int], int]]]:
    """One epoch, shuffled. Long sequences (documents, QA in context) and short ones (closed-book
    QA) go in separate batches, so little compute is spent on padding."""
    seqs = [(s, 0) for s in docs] + list(qa)
    long = [x for x in seqs if len(x[0]) > SHORT_SEQ]
    short = [x for x in seqs if len(x[0]) <= SHORT_SEQ]
    rng.shuffle(long)
    rng.shuffle(short)
    batches = [long[i : i + spec.doc_batch] for i in range(0, len(long), spec.doc_batch)]
    batches += [short[i : i + spec.qa_batch] for i in range(0, len(short), spec.qa_batch)]
    rng.shuffle(batches)
    return batches


def _passes(batch: list[tuple[list[int], int]]) -> list[list[tuple[list[int], int]]]:
    """The batch cut, in length order, into the forward passes that cost the fewest padded
    tokens, each pass costing `PASS_COST_TOKENS` more. On CPU the time goes with padded tokens,
    and one pass over articles mixed with questions asked in context pads each article to twice
    its length. The gradient is still the whole batch's (see `_train_step`)."""
    seqs = sorted(batch, key=lambda s: len(s[0]))
    cost = [0.0] + [math.inf] * len(seqs)
    start = [0] * (len(seqs) + 1)
    for end in range(1, len(seqs) + 1):
        for i in range(end):
            c = cost[i] + (end - i) * len(seqs[end - 1][0]) + PASS_COST_TOKENS
            if c < cost[end]:
                cost[end], start[end] = c, i
    passes = []
    end = len(seqs)
    while end:
        passes.append(seqs[start[end] : end])
        end = start[end]
    return passes[::-1]


def _train_step(
    model: PreTrainedModel, batch: list[tuple[list[int], int]], pad_id: int, device: torch.device
) -> float:
    """Accumulate the batch's gradient over its length-sorted passes; the loss is the mean over
    the whole batch's target tokens, as in one pass. The output layer runs only where there is a
    target: most tokens are a question's prompt or context, and the vocabulary projection would
    cost a fifth of the compute on them for nothing."""
    passes = [answer_batch(p, pad_id) for p in _passes(batch)]
    targets = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels, _ in passes)
    loss = 0.0
    for ids, labels, mask in passes:
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            wanted = labels[:, 1:] != IGNORE
            logits = model.get_output_embeddings()(hidden[:, :-1][wanted])
            part = F.cross_entropy(logits.float(), labels[:, 1:][wanted], reduction="sum") / targets
        part.backward()
        loss += part.item()
    return loss


def evaluate_qa(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    docs: list[Document],
    limit: int = 300,
    in_context: bool = False,
) -> dict[str, float]:
    """Closed-book F1, or with each question's own document in context (`in_context`)."""
    asked = [(q, d) for d in docs for q in d.questions][:limit]
    preds = generate_answers(
        model,
        tok,
        [q.question for q, _ in asked],
        contexts=[d.text for _, d in asked] if in_context else None,
        max_new_tokens=12,
    )
    return score(preds, [q.answers for q, _ in asked])


def pretrain_tokenizer(pretrain: list[Document], spec: DemoSpec) -> PreTrainedTokenizerBase:
    """The demo's BPE tokenizer, trained on the articles and questions it pretrains on."""
    return train_bpe_tokenizer(
        [d.text for d in pretrain] + [q.question for q in all_questions(pretrain)],
        vocab_size=spec.vocab_size,
    )


def untrained_model(spec: DemoSpec, tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """The spec's Llama, randomly initialised, for `tok`'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_len * 4,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def model_home(variant: str = "demo", quick: bool = False) -> Path:
    """Where `uptake bootstrap` keeps a base when no --out is given."""
    if variant == "demo" and not quick:
        return demo_model_dir()
    return demo_model_dir().parent / ("demo-quick" if quick else f"demo-{variant}")


def is_built(model_dir: Path) -> bool:
    """Builds are renamed into place when finished, so a config means a whole model."""
    return (Path(model_dir) / "config.json").exists()


def is_current(part_dir: Path, model_dir: Path) -> bool:
    """A weighting model or MAC networks built after the model they were trained for: a part
    older than its model was trained for an earlier build of it."""
    part_dir = Path(part_dir)
    if not part_dir.is_dir():
        return False
    newest = max(p.stat().st_mtime for p in [part_dir, *part_dir.iterdir()])
    return newest >= (Path(model_dir) / "config.json").stat().st_mtime


def build_demo_model(
    out_dir: Path | None = None,
    variant: str = "demo",
    world_dir: Path | None = None,
    quick: bool = False,
    spec: DemoSpec | None = None,
) -> Path:
    """Train the tokenizer and the model and save a standard HF directory with a model card."""
    spec = spec or SPECS["quick" if quick else variant]
    out = Path(out_dir) if out_dir else model_home(variant, quick)
    world = (
        Path(world_dir)
        if world_dir
        else demo_world_dir()
        if not quick
        else out.parent / "world-quick"
    )
    if not (world / "pretrain.jsonl").exists():
        write_world(world, _world_config(spec))
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    started = time.time()

    pretrain = read_documents(world / "pretrain.jsonl")
    tok = pretrain_tokenizer(pretrain, spec)
    device = default_device()
    model = untrained_model(spec, tok).to(device)
    doc_ids = _encode_docs(pretrain, tok, spec.max_len)
    qa = _encode_qa(pretrain, tok, rng, spec.context_share)
    lessons = _reading_lessons(spec, tok)
    epoch_steps = [
        len(_make_batches(doc_ids, qa + extra, spec, random.Random(0))) for extra in lessons
    ]
    total = sum(epoch_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, total // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        ),
    )
    model.train()
    bar = tqdm(
        total=total, desc=f"pretraining {variant if not quick else 'quick'} model", unit="step"
    )
    for epoch in range(1, spec.epochs + 1):
        for batch in _make_batches(doc_ids, qa + lessons[epoch - 1], spec, rng):
            loss = _train_step(model, batch, tok.pad_token_id, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if spec.monitor_every and epoch % spec.monitor_every == 0:
            model.eval()
            f = evaluate_qa(model, tok, read_documents(world / "pretrain_heldout_qa.jsonl"), 150)
            r = evaluate_qa(model, tok, read_documents(world / "retention_qa.jsonl"), 150)
            bar.write(
                f"epoch {epoch} (step {sum(epoch_steps[:epoch])}): retention F1 {r['f1']:.3f}, extraction F1 {f['f1']:.3f}"
            )
            model.train()
    bar.close()
    model.eval()

    eval_stream = read_documents(world / "eval_stream.jsonl")
    figures = {
        "retention_qa": evaluate_qa(model, tok, read_documents(world / "retention_qa.jsonl")),
        "heldout_extraction_qa": evaluate_qa(
            model, tok, read_documents(world / "pretrain_heldout_qa.jsonl")
        ),
        "eval_stream_before": evaluate_qa(model, tok, eval_stream),
        "eval_stream_in_context": evaluate_qa(model, tok, eval_stream, in_context=True),
    }
    card = {
        "variant": "quick" if quick else variant,
        "spec": asdict(spec),
        "world": str(world.resolve()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - started, 1),
        "figures": figures,
    }

    def save(tmp: Path) -> None:
        model.to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "uptake_card.json").write_text(json.dumps(card, indent=2))
        (tmp / "README.md").write_text(_model_card(card))

    return built_in_place(out, save)


def _model_card(card: dict) -> str:
    rows = "\n".join(
        f"| {name} | {f['f1']:.3f} | {f['em']:.3f} | {f['n']} |"
        for name, f in card["figures"].items()
    )
    return (
        f"# uptake demo model ({card['variant']})\n\n"
        f"A {card['parameters'] / 1e6:.1f}M-parameter Llama pretrained by `uptake bootstrap` on the "
        f"knowledge world at `{card['world']}` in {card['train_seconds']:.0f} s.\n\n"
        "Closed-book QA, except *in_context*: each eval-stream question with its own article in "
        "the prompt (can the model read its context?).\n\n"
        "| QA set | F1 | EM | questions |\n| --- | --- | --- | --- |\n"
        f"{rows}\n"
    )


def ensure_demo_model() -> Path:
    """The demo model's directory, building it first if it is not there yet."""
    out = model_home()
    return out if is_built(out) else build_demo_model()


# The demo weighting model's meta-training: through the worker's own update (clipped AdamW at the
# swept uniform rate, moments carried), inner loss normalised by the sum of weights, so that the
# weights it learns are those the worker's own steps profit from (docs/results/eval-camels-adam.md
# and demo-spec.md compare it with plain SGD). A step budget, not a time one, so that every
# machine builds that same weighting model.
DEMO_CAMELS = {
    "normalisation": "weights",
    "inner_optimizer": "adam",
    "inner_lr": 2e-3,
    "steps": 563,
    "minutes": None,
}


def build_demo_weighter(model_dir: Path, quick: bool = False) -> Path:
    """Meta-train the demo CaMeLS weighting model for `model_dir` on its world's streams."""
    from adaptation.lab.camels_training import MetaTrainConfig, meta_train

    config = MetaTrainConfig.quick() if quick else MetaTrainConfig(**DEMO_CAMELS)  # type: ignore[arg-type]
    world = _world_of(model_dir)

    def train(tmp: Path) -> None:
        meta_train(model_dir, world / "meta_train.jsonl", world / "meta_val.jsonl", tmp, config)

    return built_in_place(demo_weighter_dir(quick), train)


def build_demo_mac(model_dir: Path, quick: bool = False) -> Path:
    """Train the demo MAC networks for `model_dir` on its world's streams."""
    from adaptation.lab.mac_training import QUICK, MacTrainConfig, train_mac

    # MacTrainConfig's step budget and no time limit, so that a slower machine builds the same
    # networks (the best by validation, early: they overfit the meta-train stream soon after).
    config = QUICK if quick else MacTrainConfig()
    world = _world_of(model_dir)

    def train(tmp: Path) -> None:
        train_docs = read_documents(world / "meta_train.jsonl")
        train_mac(model_dir, train_docs, read_documents(world / "meta_val.jsonl"), tmp, config)

    return built_in_place(demo_mac_dir(quick), train)


def ensure_demo_weighter() -> Path:
    """The demo weighting model's directory, building it (and the demo model) if missing or
    trained for an earlier build of the model."""
    model = ensure_demo_model()
    out = demo_weighter_dir()
    return out if is_current(out, model) else build_demo_weighter(model)


def ensure_demo_mac() -> Path:
    """The demo MAC directory, building it (and the demo model) if missing or trained for an
    earlier build of the model."""
    model = ensure_demo_model()
    out = demo_mac_dir()
    return out if is_current(out, model) else build_demo_mac(model)


def _world_of(model_dir: Path) -> Path:
    """The world a demo model was pretrained on (its card names it): its meta-train and
    meta-validation streams hold entities the model has never seen."""
    return Path(json.loads((Path(model_dir) / "uptake_card.json").read_text())["world"])
