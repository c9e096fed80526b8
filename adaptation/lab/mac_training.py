"""Training MAC (METHODS §2): the answer-token NLL of the frozen base, given the question and the
prefix aggregated over a memory that is the whole batch of documents (each question's own
document plus the others as distractors).

Backprop dropout: only a fraction of the batch's documents is amortized with gradient; the rest
are encoded without it and serve as distractors, which keeps the memory large at a fraction of
the activation memory and time. The checkpoint with the best validation loss is kept.

Two additions keep a large bank from silencing the base, which the QA loss alone never sees:
- `distractors`: the memory also holds that many modulations of earlier batches (a queue,
  without gradient), so training reads banks as large as the service's, folded
  hierarchically like them;
- `retention_weight`: questions about documents the memory does not hold (the next batch's)
  add the KL from the plain base's answer distribution to the prefixed one's, so that a bank
  that does not know the answer leaves the base's own answer alone.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adaptation.data import Document
from adaptation.mac.amortizer import pad_batch, token_lists
from adaptation.mac.bank import MemoryBank
from adaptation.mac.injection import prefix_logits
from adaptation.mac.networks import MacConfig, MacNetworks
from adaptation.mac.system import MacSystem
from adaptation.metrics import score
from adaptation.modeling import load_base
from adaptation.prompts import qa_tokens
from adaptation.updater import weighted_lm_loss


@dataclass(frozen=True)
class MacTrainConfig:
    """Optimisation and network sizes. `max_steps` and `time_limit_s` stop training early
    (keeping the best checkpoint so far; the learning rate decays on whichever budget runs out
    first), so a run fits a budget whatever the machine. The final F1 evaluation comes after it.
    `encoder` says what reads the documents: the networks' `own` small encoder, or the frozen
    `base` at hidden state `encoder_layer`; `question_encoder` the same for questions (None:
    as `encoder`)."""

    epochs: int = 40
    max_steps: int | None = None
    batch_docs: int = 16
    lr: float = 3e-4
    warmup_steps: int = 50
    backprop_dropout: float = 0.25
    grad_clip: float = 1.0
    val_every: int = 0
    time_limit_s: float | None = None
    max_train_docs: int | None = None
    max_val_docs: int | None = None
    eval_questions: int = 240
    seed: int = 0
    width: int = 256
    layers: int = 2
    query_layers: int = 2
    question_layers: int = 1
    heads: int = 4
    num_tokens: int = 16
    max_length: int = 256
    window: int = 32
    chunk: int = 32
    dropout: float = 0.0
    encoder: Literal["own", "base"] = "own"
    question_encoder: Literal["own", "base"] | None = None
    encoder_layer: int = -1
    distractors: int = 0
    retention_weight: float = 0.0


QUICK = MacTrainConfig(
    epochs=6,
    batch_docs=8,
    lr=1e-3,
    warmup_steps=5,
    time_limit_s=100.0,
    max_train_docs=64,
    max_val_docs=16,
    eval_questions=24,
    width=64,
    layers=1,
    query_layers=1,
    num_tokens=8,
    max_length=128,
    window=8,
    chunk=4,
)


@dataclass
class MacTrainReport:
    base: str
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    embeddings_from_base: bool = False
    first_train_loss: float | None = None
    last_train_loss: float | None = None
    val_loss_untrained: float | None = None
    val_loss_no_memory: float | None = None
    val_retention_kl: float | None = None
    best_val_loss: float | None = None
    best_step: int = 0
    val_history: list[tuple[int, float, float]] = field(default_factory=list)
    f1_no_memory: float | None = None
    f1_own_memory: float | None = None
    f1_batch_memory: float | None = None
    f1_full_memory: float | None = None
    full_memory_entries: int = 0
    config: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class _QA:
    question_tokens: list[int]
    lm_tokens: list[int]
    prompt_length: int


@dataclass(frozen=True)
class _Doc:
    tokens: list[int]
    qas: tuple[_QA, ...]


def _prepare(
    docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase, config: MacConfig
) -> list[_Doc]:
    out = []
    doc_tokens = token_lists(tokenizer, [d.text for d in docs], config.amortizer.max_length)
    for doc, tokens in zip(docs, doc_tokens):
        qas = []
        for qa in doc.questions:
            if not qa.answers:
                continue
            lm_tokens, prompt_length = qa_tokens(tokenizer, qa.question, qa.answers[0])
            q = token_lists(tokenizer, [qa.question], config.question.max_length)[0]
            qas.append(_QA(q, lm_tokens, prompt_length))
        out.append(_Doc(tokens, tuple(qas)))
    return out


def _lm_batch(
    qas: Sequence[_QA], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt+answer ids, mask, and loss weights that are 1 on answer tokens only."""
    length = max(len(q.lm_tokens) for q in qas)
    ids = torch.full((len(qas), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(qas), length), dtype=torch.long)
    weights = torch.zeros((len(qas), length))
    for i, qa in enumerate(qas):
        start = length - len(qa.lm_tokens)
        ids[i, start:] = torch.tensor(qa.lm_tokens)
        mask[i, start:] = 1
        weights[i, start + qa.prompt_length :] = 1.0
    return ids.to(device), mask.to(device), weights.to(device)


def _memory(
    networks: MacNetworks,
    batch: Sequence[_Doc],
    pad_id: int,
    device: torch.device,
    grad_docs: Sequence[int] | None,
) -> torch.Tensor:
    """The batch's modulations [N, T, d]; only `grad_docs` (None: all) carry gradient."""
    ids, mask = pad_batch([d.tokens for d in batch], pad_id, device)
    if grad_docs is None:
        return networks.modulate(ids, mask)
    chosen = set(grad_docs)
    with_grad = torch.tensor(sorted(chosen), dtype=torch.long, device=device)
    rest = torch.tensor(
        [i for i in range(len(batch)) if i not in chosen], dtype=torch.long, device=device
    )
    with torch.no_grad():
        frozen = networks.modulate(ids[rest], mask[rest]) if len(rest) else None
    live = networks.modulate(ids[with_grad], mask[with_grad])
    memory = live.new_empty(len(batch), *live.shape[1:])
    memory = memory.index_copy(0, with_grad, live)
    if frozen is not None:
        memory = memory.index_copy(0, rest, frozen)
    return memory


def _prefixed_logits(
    networks: MacNetworks,
    base: PreTrainedModel,
    qas: Sequence[_QA],
    memory: torch.Tensor,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base's logits on the questions' prompt+answer, reading the memory; and the batch."""
    device = memory.device
    q_ids, q_mask = pad_batch([qa.question_tokens for qa in qas], pad_id, device)
    prefix = networks.prefix(q_ids, q_mask, memory[None])
    lm_ids, lm_mask, weights = _lm_batch(qas, pad_id, device)
    return prefix_logits(base, prefix, lm_ids, lm_mask), lm_ids, lm_mask, weights


@dataclass(frozen=True)
class BatchLoss:
    """`total` = `qa` + retention_weight * `kl` (kl is 0 without strangers)."""

    total: torch.Tensor
    qa: torch.Tensor
    kl: torch.Tensor
    memory: torch.Tensor


def batch_loss(
    networks: MacNetworks,
    base: PreTrainedModel,
    batch: Sequence[_Doc],
    pad_id: int,
    grad_docs: Sequence[int] | None = None,
    distractors: torch.Tensor | None = None,
    strangers: Sequence[_QA] = (),
    retention_weight: float = 0.0,
) -> BatchLoss:
    """Answer NLL of every question in the batch, the memory being all the batch's documents
    plus `distractors` [K, T, d]; with `strangers` (questions on documents outside the memory),
    plus the KL that keeps their answers the plain base's. `grad_docs`: which documents are
    amortized with gradient (None: all)."""
    device = next(base.parameters()).device
    own = _memory(networks, batch, pad_id, device, grad_docs)
    memory = own if distractors is None else torch.cat([own, distractors.to(own.dtype)])
    qas = [qa for d in batch for qa in d.qas]
    logits, lm_ids, lm_mask, weights = _prefixed_logits(networks, base, qas, memory, pad_id)
    qa = weighted_lm_loss(logits, lm_ids, weights, lm_mask, normalisation="weights")
    kl = qa.new_zeros(())
    if strangers:
        logits, lm_ids, lm_mask, weights = _prefixed_logits(
            networks, base, strangers, memory, pad_id
        )
        with torch.no_grad():
            plain = prefix_logits(base, None, lm_ids, lm_mask)
        kl = _answer_kl(plain, logits, weights)
    return BatchLoss(total=qa + retention_weight * kl, qa=qa, kl=kl, memory=own.detach())


def _answer_kl(plain: torch.Tensor, prefixed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """KL(plain || prefixed) of the next-token distributions that predict answer tokens."""
    at = weights[:, 1:] > 0
    log_p = torch.log_softmax(plain[:, :-1][at].float(), dim=-1)
    log_q = torch.log_softmax(prefixed[:, :-1][at].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@torch.no_grad()
def _no_memory_loss(base: PreTrainedModel, batches: Sequence[Sequence[_Doc]], pad_id: int) -> float:
    device = next(base.parameters()).device
    losses = []
    for batch in batches:
        lm_ids, lm_mask, weights = _lm_batch([qa for d in batch for qa in d.qas], pad_id, device)
        logits = prefix_logits(base, None, lm_ids, lm_mask)
        losses.append(float(weighted_lm_loss(logits, lm_ids, weights, lm_mask, "weights")))
    return sum(losses) / len(losses)


@torch.no_grad()
def _validate(
    networks: MacNetworks, base: PreTrainedModel, batches: Sequence[Sequence[_Doc]], pad_id: int
) -> tuple[float, float]:
    """The mean answer NLL with each batch as the memory, and the mean answer KL that memory
    causes on the next batch's questions (0 for a single batch)."""
    networks.eval()
    qa, kl = [], []
    for i, batch in enumerate(batches):
        strangers = _strangers(batches, i)
        loss = batch_loss(networks, base, batch, pad_id, strangers=strangers)
        qa.append(float(loss.qa))
        kl.append(float(loss.kl))
    networks.train()
    return sum(qa) / len(qa), sum(kl) / len(kl)


def _strangers(batches: Sequence[Sequence[_Doc]], i: int) -> list[_QA]:
    """One question per document of the batch after batch i: strangers to its memory (none when
    there is no other batch)."""
    if len(batches) < 2:
        return []
    return [d.qas[0] for d in batches[(i + 1) % len(batches)] if d.qas]


def _batches(docs: Sequence[_Doc], size: int, rng: random.Random | None) -> list[list[_Doc]]:
    order = list(docs)
    if rng is not None:
        rng.shuffle(order)
    out = [order[i : i + size] for i in range(0, len(order), size)]
    return [b for b in out if any(d.qas for d in b)]


def _memory_f1(
    system: MacSystem, docs: Sequence[Document], limit: int, batch_docs: int
) -> tuple[dict[str, float], int]:
    """F1 on the first `limit` questions of `docs` by what each question's memory holds: none,
    its own document alone (the most any aggregation can hand the base), its batch of
    `batch_docs` documents, or all `docs`. Also returns the full memory's entries."""
    system.bank = MemoryBank(system.bank.num_tokens, system.bank.width)
    system.ingest_many([(d.id, d.text) for d in docs])
    asked = [(i, qa) for i, d in enumerate(docs) for qa in d.questions][:limit]
    questions = [qa.question for _, qa in asked]
    golds = [list(qa.answers) for _, qa in asked]

    def f1(doc_ids: Callable[[int], list[str]] | None) -> float:
        memories = None if doc_ids is None else [doc_ids(i) for i, _ in asked]
        return score(system.answer(questions, doc_ids=memories), golds)["f1"]

    def batch_of(i: int) -> list[str]:
        start = i - i % batch_docs
        return [d.id for d in docs[start : start + batch_docs]]

    figures = {
        "none": f1(lambda i: []),
        "own": f1(lambda i: [docs[i].id]),
        "batch": f1(batch_of),
        "full": f1(None),
    }
    return figures, len(system.bank)


def train_mac(
    base_dir: str | os.PathLike[str],
    train_docs: Sequence[Document],
    val_docs: Sequence[Document],
    out_dir: str | os.PathLike[str],
    config: MacTrainConfig | None = None,
    device: str | None = None,
) -> MacTrainReport:
    """Train MAC networks for the base at `base_dir`; the best checkpoint is saved to `out_dir`
    as a MacSystem directory (empty bank) plus training.json."""
    cfg = config or MacTrainConfig()
    started = time.monotonic()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    base, tok = load_base(base_dir, device=device)
    base.requires_grad_(False)
    pad_id = int(tok.pad_token_id)
    mac_config = MacConfig.for_base(
        base,
        width=cfg.width,
        layers=cfg.layers,
        query_layers=cfg.query_layers,
        question_layers=cfg.question_layers,
        heads=cfg.heads,
        num_tokens=cfg.num_tokens,
        max_length=cfg.max_length,
        window=cfg.window,
        chunk=cfg.chunk,
        dropout=cfg.dropout,
        encoder=cfg.encoder,
        question_encoder=cfg.question_encoder,
        encoder_layer=cfg.encoder_layer,
    )
    networks = MacNetworks(mac_config)
    networks.bind(base)
    report = MacTrainReport(base=str(base_dir), config=asdict(cfg))
    report.embeddings_from_base = networks.init_from_base(base)
    networks.to(base.device).train()
    train_docs = list(train_docs)[: cfg.max_train_docs]
    val_docs = list(val_docs)[: cfg.max_val_docs]
    train = _prepare(train_docs, tok, mac_config)
    val_batches = _batches(_prepare(val_docs, tok, mac_config), cfg.batch_docs, None)
    if not any(d.qas for d in train) or not val_batches:
        raise ValueError("MAC training needs documents with questions in both --train and --val")

    steps_per_epoch = len(_batches(train, cfg.batch_docs, random.Random(0)))
    total = max(1, min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf))
    val_every = cfg.val_every or steps_per_epoch
    optimizer = torch.optim.Adam(networks.parameters(), lr=cfg.lr)
    report.val_loss_no_memory = _no_memory_loss(base, val_batches, pad_id)

    def validate() -> float:
        """The checkpoint criterion: answer NLL, plus the weighted KL when training for it."""
        qa, kl = _validate(networks, base, val_batches, pad_id)
        report.val_history.append((step, qa, kl))
        return qa + cfg.retention_weight * kl

    step = 0
    report.best_val_loss = report.val_loss_untrained = validate()
    report.val_retention_kl = report.val_history[-1][2]
    best_state = copy.deepcopy(networks.state_dict())
    queue: deque[torch.Tensor] = deque(maxlen=cfg.distractors)
    system = MacSystem(networks, base, tok)
    networks.train()

    def progress() -> float:
        """How much of the budget is spent: steps, or wall-clock time if that runs out first."""
        spent = step / total
        if cfg.time_limit_s:
            spent = max(spent, (time.monotonic() - started) / cfg.time_limit_s)
        return spent

    bar = tqdm(total=total, desc="meta-train mac", unit="step")
    smoothed: float | None = None
    while step < total and not report.stopped_early:
        batches = _batches(train, cfg.batch_docs, rng)
        for i, batch in enumerate(batches):
            n_grad = max(1, math.ceil(cfg.backprop_dropout * len(batch)))
            grad_docs = rng.sample(range(len(batch)), n_grad)
            strangers = _strangers(batches, i) if cfg.retention_weight else ()
            result = batch_loss(
                networks,
                base,
                batch,
                pad_id,
                grad_docs,
                distractors=torch.cat(list(queue)) if queue else None,
                strangers=strangers,
                retention_weight=cfg.retention_weight,
            )
            queue.extend(result.memory.split(1))
            loss = result.total
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps, progress())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(networks.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            report.first_train_loss = report.first_train_loss if step > 1 else value
            report.last_train_loss = value
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            bar.update(1)
            out_of_time = cfg.time_limit_s is not None and progress() >= 1.0
            if step % val_every == 0 or step == total or out_of_time:
                val = validate()
                if val < report.best_val_loss:
                    report.best_val_loss, report.best_step = val, step
                    report.val_retention_kl = report.val_history[-1][2]
                    best_state = copy.deepcopy(networks.state_dict())
                    system.save(out_dir)
                bar.set_postfix(
                    loss=f"{smoothed:.3f}", val=f"{val:.3f}", best=f"{report.best_val_loss:.3f}"
                )
            if step >= total or out_of_time:
                report.stopped_early = out_of_time and step < total
                break
    bar.close()
    report.steps = step

    networks.load_state_dict(best_state)
    networks.eval()
    system.save(out_dir)
    if cfg.eval_questions:
        f1, report.full_memory_entries = _memory_f1(
            system, val_docs, cfg.eval_questions, cfg.batch_docs
        )
        report.f1_no_memory, report.f1_own_memory = f1["none"], f1["own"]
        report.f1_batch_memory, report.f1_full_memory = f1["batch"], f1["full"]
    report.seconds = time.monotonic() - started
    Path(out_dir, "training.json").write_text(json.dumps(asdict(report), indent=2), "utf-8")
    return report


def _lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warmup, then cosine decay to a tenth as `progress` (0..1 of the budget) runs out."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
