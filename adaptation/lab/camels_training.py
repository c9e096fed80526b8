"""Meta-training the CaMeLS weighting model (METHODS.md §1).

An episode is k documents with their questions. The inner loop applies the documents one after
another to the base's LoRA parameters, one differentiable step each (plain SGD, or the
updater's clipped Adam with its moments carried along), on the loss weighted by the weighting
model. The outer loss is the updated model's answer NLL on the episode's questions,
plus c_kl times the KL between the model before and after the updates on an unrelated passage.
Its gradient flows back through the updates into the weighting model's trainable parameters only:
the base, the starting LoRA weights and any frozen layers of a pretrained body are constants.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from adaptation.data import Document, read_documents
from adaptation.modeling import LoraSettings, attach_lora, load_base, lora_parameters
from adaptation.paths import built_in_place
from adaptation.prompts import answer_batch, qa_tokens
from adaptation.updater import Normalisation, UpdateConfig, weighted_lm_loss
from adaptation.weighting.camels import CamelsSpec, CamelsWeighter

Params = dict[str, torch.Tensor]
Paths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
InnerOptimizer = Literal["sgd", "adam"]
# The OnlineUpdater's step: its gradient clip, then torch.optim.AdamW at its default betas and eps.
WORKER_CLIP = UpdateConfig().max_grad_norm
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class MetaTrainConfig:
    """Meta-training settings; the bracketed reference values of METHODS.md §1 where they carry
    over, larger learning rates where the regime differs (LoRA from B=0 needs a bigger inner step,
    and the weighting body here starts from scratch rather than from a pretrained LM). With
    "tokens" normalisation the untrained weight ln2/3 scales inner_lr to an effective ~0.07: on
    the demo model that lowers answer NLL a little at small KL, leaving the weighting model room
    to raise the weight of fact tokens (plain SGD at lr 1 on weight 1 diverges there).

    inner_optimizer "adam" takes the OnlineUpdater's step instead of SGD's: the gradient clipped
    as the worker clips it, then Adam with moments carried across documents until the LoRA is reset,
    as the worker's persistent optimiser carries them across a stream. Its inner_lr is then an
    Adam learning rate (the updater's, e.g. 2e-3), not an SGD one.

    steps counts outer optimiser steps (each `grad_accum` episodes): the budget, so that a slower
    machine builds the same model. `minutes`, when set, also stops training earlier so that the
    whole run, validation included, fits that time; the model then depends on the machine.

    body names a pretrained causal LM (a packaged base or an HF directory) whose embeddings and
    first body_layers layers become the weighting model's body, with its tokenizer; None builds a
    body from `spec`. freeze_layers, when set, holds the embeddings and the body's first
    freeze_layers layers fixed.
    """

    episode_docs: int = 6
    inner_optimizer: InnerOptimizer = "sgd"
    inner_lr: float = 0.3
    outer_lr: float = 1e-3
    c_kl: float = 0.1
    grad_accum: int = 4
    reset_every: int = 24
    steps: int = 2000
    minutes: float | None = None
    val_every: int = 25
    val_episodes: int = 8
    normalisation: Normalisation = "tokens"
    fixed_length: int = 1024
    max_doc_tokens: int = 512
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    spec: CamelsSpec = field(default_factory=CamelsSpec)
    body: str | None = None
    body_layers: int = 4
    freeze_layers: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "episode_docs",
            "grad_accum",
            "reset_every",
            "steps",
            "val_every",
            "val_episodes",
            "max_doc_tokens",
            "lora_rank",
            "body_layers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.inner_lr <= 0 or self.outer_lr <= 0 or self.c_kl < 0:
            raise ValueError("inner_lr and outer_lr must be positive and c_kl non-negative")
        if self.inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer is sgd or adam, got {self.inner_optimizer!r}")
        layers = self.body_layers if self.body else self.spec.layers
        if self.freeze_layers is not None and not 0 <= self.freeze_layers <= layers:
            raise ValueError(
                f"freeze_layers must be 0 to the body's {layers} layers, got {self.freeze_layers}"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> MetaTrainConfig:
        """A smoke run: a few tiny episodes, for tests and for trying the command out."""
        base = cls(
            episode_docs=2,
            grad_accum=1,
            reset_every=4,
            steps=3,
            minutes=1.5,
            val_every=2,
            val_episodes=1,
            max_doc_tokens=128,
            spec=CamelsSpec(hidden=32, layers=1, heads=2, intermediate=64, head_hidden=32),
        )
        return replace(base, **overrides)


@dataclass(frozen=True)
class PreparedDoc:
    """A document tokenised for both models, with the map from weighting tokens to base tokens.

    overlap[i, j] is 1 where base token i and weighting token j share a character, so the base
    weight max_j(overlap[i, j] * w[j]) equals project_to_tokens(char_weights) and stays
    differentiable in w.
    """

    id: str
    key: str
    base_ids: torch.Tensor
    weighter_ids: list[int]
    overlap: torch.Tensor
    qa: tuple[tuple[list[int], int], ...]


@dataclass(frozen=True)
class InnerState:
    """What the inner loop carries from one document to the next: the LoRA weights and, for the
    Adam inner optimiser, its moments and step count (empty and 0 for SGD, or after a reset)."""

    theta: Params
    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)
    t: int = 0

    def detached(self) -> InnerState:
        """The same state cut from the graph, with the weights as fresh leaves to differentiate
        against."""
        return InnerState(
            theta={n: x.detach().clone().requires_grad_(True) for n, x in self.theta.items()},
            m={n: x.detach() for n, x in self.m.items()},
            v={n: x.detach() for n, x in self.v.items()},
            t=self.t,
        )


@dataclass(frozen=True)
class OuterLoss:
    total: torch.Tensor
    qa: torch.Tensor
    kl: torch.Tensor
    mean_weight: float
    state: InnerState

    def figures(self) -> dict[str, float]:
        return {
            "outer": float(self.total.detach()),
            "qa": float(self.qa.detach()),
            "kl": float(self.kl.detach()),
            "mean_weight": self.mean_weight,
        }


def overlap_matrix(
    base_offsets: Sequence[tuple[int, int]],
    weighter_offsets: Sequence[tuple[int, int]],
    text_length: int,
) -> torch.Tensor:
    """[Tb, Tw] 1 where base token i and weighting token j share a character. A base token with
    an empty span stands for the character where it sits, as in project_to_tokens."""
    last = max(text_length - 1, 0)
    spans = [(s, e) if e > s else (min(s, last), min(s, last) + 1) for s, e in base_offsets]
    b = torch.tensor(spans, dtype=torch.long).view(-1, 2)
    w = torch.tensor(list(weighter_offsets), dtype=torch.long).view(-1, 2)
    start = torch.maximum(b[:, None, 0], w[None, :, 0])
    end = torch.minimum(b[:, None, 1], w[None, :, 1])
    return (end > start).float()


def project_weights(weights: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Differentiable twin of project_to_tokens for one document: [Tw] -> [Tb]."""
    if overlap.shape[1] == 0:
        return weights.new_zeros(overlap.shape[0])
    return (overlap * weights.unsqueeze(0)).amax(dim=1)


def _entity_key(doc: Document) -> str:
    return str(doc.meta.get("entity") or doc.id)


class MetaLearner:
    """The bi-level problem for one base: holds the frozen base with its LoRA, the weighting
    model and its optimiser."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        weighter: CamelsWeighter,
        config: MetaTrainConfig,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.weighter = weighter
        self.config = config
        self.model.requires_grad_(False)
        self.trainable = weighter.freeze(config.freeze_layers)
        self.theta_init: Params = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
        if not self.theta_init:
            raise ValueError("the base has no LoRA parameters: build it with attach_lora")
        self.device = next(iter(self.theta_init.values())).device
        self.weighter.to(self.device)
        self.weighter.train()
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.outer_lr)
        self.skipped_steps = 0
        self._prepared: dict[str, PreparedDoc] = {}

    def prepare(self, doc: Document) -> PreparedDoc:
        cached = self._prepared.get(doc.id)
        if cached is not None:
            return cached
        base = self.tokenizer(
            doc.text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=True,
            max_length=self.config.max_doc_tokens,
        )
        base_offsets = [tuple(o) for o in base["offset_mapping"]]
        text_end = max((max(e, s + 1) for s, e in base_offsets), default=0)
        w_ids, w_offsets = self.weighter.encode(doc.text)
        keep = sum(1 for s, _ in w_offsets if s < text_end)
        qa = []
        for q in doc.questions:
            if not q.answers:
                continue
            qa.append(qa_tokens(self.tokenizer, q.question, q.answers[0]))
        prepared = PreparedDoc(
            id=doc.id,
            key=_entity_key(doc),
            base_ids=torch.tensor(base["input_ids"], dtype=torch.long, device=self.device),
            weighter_ids=w_ids[:keep],
            overlap=overlap_matrix(base_offsets, w_offsets[:keep], len(doc.text)).to(self.device),
            qa=tuple(qa),
        )
        self._prepared[doc.id] = prepared
        return prepared

    def start(self, carried: InnerState | None = None) -> InnerState:
        """Fresh leaves to differentiate the inner steps against, from the starting LoRA or a
        carried state; their own gradient is never taken (the outer backward is restricted to
        the weighting model)."""
        return (carried or InnerState(self.theta_init)).detached()

    def _logits(
        self, theta: Params, ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids}
        if mask is not None:
            kwargs["attention_mask"] = mask
        return functional_call(self.model, theta, (), kwargs).logits

    def doc_weights(self, docs: Sequence[PreparedDoc]) -> list[torch.Tensor]:
        """Per base token weights of each document, in the weighting model's graph."""
        raw = self.weighter.weights_for_batch([d.weighter_ids for d in docs])
        return [project_weights(w, d.overlap) for w, d in zip(raw, docs, strict=True)]

    def inner_loop(
        self,
        docs: Sequence[PreparedDoc],
        state: InnerState,
        weights: Sequence[torch.Tensor],
        create_graph: bool,
    ) -> InnerState:
        """One step per document, in order; differentiable through the steps if asked."""
        cfg = self.config
        for doc, w in zip(docs, weights, strict=True):
            ids = doc.base_ids.unsqueeze(0)
            loss = weighted_lm_loss(
                self._logits(state.theta, ids),
                ids,
                w.unsqueeze(0),
                None,
                cfg.normalisation,
                cfg.fixed_length,
            )
            grads = torch.autograd.grad(loss, list(state.theta.values()), create_graph=create_graph)
            state = self._step(state, dict(zip(state.theta, grads, strict=True)))
            if not create_graph:
                state = state.detached()
        return state

    def _step(self, state: InnerState, grads: Params) -> InnerState:
        lr = self.config.inner_lr
        if self.config.inner_optimizer == "sgd":
            return InnerState({n: x - lr * grads[n] for n, x in state.theta.items()})
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        clip = torch.clamp(WORKER_CLIP / (norm + 1e-6), max=1.0)
        (b1, b2), t = ADAM_BETAS, state.t + 1
        theta, m, v = {}, {}, {}
        for n, x in state.theta.items():
            g = grads[n] * clip
            m[n] = b1 * state.m.get(n, torch.zeros_like(g)) + (1 - b1) * g
            v[n] = b2 * state.v.get(n, torch.zeros_like(g)) + (1 - b2) * g * g
            # The floor keeps sqrt's derivative finite where v is 0 (a fresh LoRA's A matrices get
            # zero gradient) and is far below eps, so the step is AdamW's.
            denom = torch.sqrt((v[n] / (1 - b2**t)).clamp_min(1e-30)) + ADAM_EPS
            theta[n] = x - lr * (m[n] / (1 - b1**t)) / denom
        return InnerState(theta, m, v, t)

    def answer_nll(self, theta: Params, docs: Sequence[PreparedDoc]) -> torch.Tensor:
        """Mean NLL of the answer tokens (question tokens masked) over the episode's questions."""
        seqs = [qa for d in docs for qa in d.qa]
        if not seqs:
            raise ValueError("an episode needs at least one question with an answer")
        ids, labels, mask = (t.to(self.device) for t in answer_batch(seqs, pad_id=0))
        logits = self._logits(theta, ids, mask)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )

    def locality_kl(self, before: Params, after: Params, passage: PreparedDoc) -> torch.Tensor:
        """Token-level KL(before || after) on a passage the episode is not about."""
        ids = passage.base_ids.unsqueeze(0)
        with torch.no_grad():
            log_p = F.log_softmax(self._logits(before, ids).float(), dim=-1)
        log_q = F.log_softmax(self._logits(after, ids).float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def outer_loss(
        self,
        docs: Sequence[PreparedDoc],
        passage: PreparedDoc,
        start: InnerState,
        create_graph: bool = True,
        weights: Sequence[torch.Tensor] | None = None,
    ) -> OuterLoss:
        """Apply the episode from `start`, then score it. `weights` overrides the weighting model
        (e.g. uniform weights, for a baseline)."""
        if weights is None:
            with torch.set_grad_enabled(create_graph):
                weights = self.doc_weights(docs)
        state = self.inner_loop(docs, start, weights, create_graph)
        with torch.set_grad_enabled(create_graph):
            qa = self.answer_nll(state.theta, docs)
            kl = self.locality_kl(start.theta, state.theta, passage)
            total = qa + self.config.c_kl * kl
        n = sum(int(w.numel()) for w in weights)
        mean_weight = float(sum(float(w.detach().sum()) for w in weights) / max(n, 1))
        return OuterLoss(total=total, qa=qa, kl=kl, mean_weight=mean_weight, state=state)

    def backward(self, out: OuterLoss, scale: float = 1.0) -> None:
        """Accumulate the outer gradient into the weighting model's trainable parameters, and
        nowhere else."""
        (out.total * scale).backward(inputs=self.trainable)

    def step(self) -> float:
        """One Adam step on the weighting model from the accumulated gradient; returns its norm.

        A non-finite gradient (an inner loop that blew up) is dropped, not applied: one such step
        would turn every weight into NaN for the rest of the run."""
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def unadapted_nll(self, docs: Sequence[PreparedDoc]) -> float:
        return float(self.answer_nll(self.theta_init, docs))

    def validate(
        self, episodes: Sequence[tuple[list[PreparedDoc], PreparedDoc]], uniform: bool = False
    ) -> dict[str, float]:
        """Mean outer figures over fixed episodes, each from the starting LoRA. `uniform` weighs
        every token 1 instead, the plain fine-tuning baseline."""
        was_training = self.weighter.training
        self.weighter.eval()
        sums: dict[str, float] = {}
        try:
            for docs, passage in episodes:
                weights = (
                    [torch.ones(d.base_ids.shape, device=self.device) for d in docs]
                    if uniform
                    else None
                )
                figures = self.outer_loss(docs, passage, self.start(), False, weights).figures()
                for k, v in figures.items():
                    sums[k] = sums.get(k, 0.0) + v
        finally:
            self.weighter.train(was_training)
        return {k: v / max(len(episodes), 1) for k, v in sums.items()}


def sample_episodes(
    docs: Sequence[Document], k: int, rng: random.Random
) -> Iterator[tuple[list[Document], Document]]:
    """Endless episodes of k documents about k different entities (so no episode asks about a
    fact and its later change at once), each with one passage from outside it for the KL term.
    Every document is used once per pass."""
    with_qa = [d for d in docs if any(q.answers for q in d.questions)]
    if len({_entity_key(d) for d in with_qa}) < k:
        raise ValueError(
            f"need documents with questions about at least {k} different entities "
            f"for episodes of {k}; got {len(with_qa)} documents"
        )
    if len(docs) <= k:
        raise ValueError(
            f"need more than {k} documents: one outside each episode serves the KL term"
        )
    while True:
        pool = list(with_qa)
        rng.shuffle(pool)
        episode: list[Document] = []
        waiting: list[Document] = []
        while pool or waiting:
            if not pool or len(episode) == k:
                if len(episode) < k:
                    break
                ids = {d.id for d in episode}
                passage = rng.choice([d for d in docs if d.id not in ids])
                yield episode, passage
                pool = waiting + pool
                episode, waiting = [], []
                continue
            d = pool.pop()
            if any(_entity_key(e) == _entity_key(d) for e in episode):
                waiting.append(d)
            else:
                episode.append(d)


@dataclass(frozen=True)
class MetaTrainResult:
    out_dir: Path
    card: dict[str, Any]


def _save_atomically(weighter: CamelsWeighter, out: Path, card: dict[str, Any]) -> None:
    built_in_place(out, lambda tmp: weighter.save(tmp, card))


def build_learner(
    base_dir: str | os.PathLike[str],
    config: MetaTrainConfig,
    tokenizer: PreTrainedTokenizerFast | None = None,
    device: str | torch.device | None = None,
) -> MetaLearner:
    """Load the base in fp32 with a fresh LoRA and pair it with an untrained weighting model: a
    pretrained body with its own tokenizer when the config names one, else a body built from the
    spec whose tokenizer is `tokenizer` or else the base's."""
    torch.manual_seed(config.seed)
    model, base_tok = load_base(base_dir, device=device, dtype=torch.float32)
    # Meta-gradients differentiate through a backward pass; fused CPU attention has no such
    # derivative, the eager path does.
    model.set_attn_implementation("eager")
    peft_model = attach_lora(model, LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha))
    peft_model.eval()
    if config.body is not None:
        if tokenizer is not None:
            raise ValueError("a pretrained body brings its own tokenizer; give no other")
        weighter = CamelsWeighter.from_pretrained_body(config.body, config.body_layers, config.spec)
        return MetaLearner(peft_model, base_tok, weighter, config)
    own_tok = tokenizer if tokenizer is not None else base_tok
    if not getattr(own_tok, "is_fast", False):
        raise ValueError(
            "the base's tokenizer is not a fast tokenizer; give the weighting model "
            "a fast tokenizer of its own (--tokenizer DIR)"
        )
    return MetaLearner(peft_model, base_tok, CamelsWeighter(own_tok, config.spec), config)


def read_all(paths: Paths) -> list[Document]:
    """The documents of one file, or of several in order."""
    if isinstance(paths, (str, os.PathLike)):
        return read_documents(paths)
    return [d for path in paths for d in read_documents(path)]


def _named(paths: Paths) -> str | list[str]:
    return str(paths) if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]


def meta_train(
    base_dir: str | os.PathLike[str],
    train_path: Paths,
    val_path: Paths,
    out_dir: str | os.PathLike[str],
    config: MetaTrainConfig | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MetaTrainResult:
    """Meta-train a weighting model for `base_dir` and save the best one (by validation outer
    loss) to `out_dir`. The training and validation documents may each come from several files
    (e.g. SQuAD's tuning titles and the world's meta-train people). `tokenizer` is a from-scratch
    body's own; by default the base's."""
    cfg = config or MetaTrainConfig()
    started = time.monotonic()
    rng = random.Random(cfg.seed)
    train_docs = read_all(train_path)
    val_docs = read_all(val_path)
    learner = build_learner(base_dir, cfg, tokenizer, device)
    weighter = learner.weighter

    val_stream = sample_episodes(val_docs, cfg.episode_docs, random.Random(cfg.seed + 1))
    val_episodes = [
        ([learner.prepare(d) for d in docs], learner.prepare(passage))
        for docs, passage in (next(val_stream) for _ in range(cfg.val_episodes))
    ]
    unadapted = sum(learner.unadapted_nll(docs) for docs, _ in val_episodes) / len(val_episodes)
    baseline = learner.validate(val_episodes, uniform=True)
    val_started = time.monotonic()
    initial = learner.validate(val_episodes)
    val_seconds = time.monotonic() - val_started
    best, best_step = initial, 0
    out = Path(out_dir)
    card: dict[str, Any] = {
        "method": "camels",
        "base": str(base_dir),
        "base_model_type": getattr(learner.model.config, "model_type", None),
        "train": _named(train_path),
        "val": _named(val_path),
        "normalisation": cfg.normalisation,
        "inner_optimizer": cfg.inner_optimizer,
        "config": {k: v for k, v in asdict(cfg).items() if k != "spec"},
    }
    if cfg.body is not None:
        card["body_from"] = f"{cfg.body}, first {cfg.body_layers} layers"
    if cfg.freeze_layers is not None:
        card["frozen"] = f"embeddings and the first {cfg.freeze_layers} body layers"

    def save_best() -> None:
        card["validation"] = {
            "best_step": best_step,
            "outer": best["outer"],
            "qa_nll": best["qa"],
            "kl": best["kl"],
            "mean_weight": best["mean_weight"],
            "initial_qa_nll": initial["qa"],
            "uniform_weight_1_qa_nll": baseline["qa"],
            "uniform_weight_1_kl": baseline["kl"],
            "unadapted_qa_nll": unadapted,
        }
        _save_atomically(weighter, out, card)

    save_best()
    deadline = started + cfg.minutes * 60 if cfg.minutes else math.inf
    train_stream = sample_episodes(train_docs, cfg.episode_docs, rng)
    carried: InnerState | None = None
    docs_since_reset = 0
    episodes_done = 0
    train_seconds = 0.0
    step = 0
    bar = tqdm(total=cfg.steps, desc="meta-training camels", unit="step", disable=not progress)
    for step in range(1, cfg.steps + 1):
        step_started = time.monotonic()
        sums = {"outer": 0.0, "qa": 0.0, "kl": 0.0}
        for _ in range(cfg.grad_accum):
            if carried is None or docs_since_reset >= cfg.reset_every:
                carried, docs_since_reset = None, 0
            docs, passage = next(train_stream)
            episode = [learner.prepare(d) for d in docs]
            result = learner.outer_loss(episode, learner.prepare(passage), learner.start(carried))
            learner.backward(result, 1.0 / cfg.grad_accum)
            diverged = not math.isfinite(result.figures()["outer"])
            carried = None if diverged else result.state.detached()
            docs_since_reset += len(episode)
            episodes_done += 1
            figures = result.figures()
            for key in sums:
                sums[key] += figures[key] / cfg.grad_accum
        learner.step()
        train_seconds += time.monotonic() - step_started
        bar.update(1)
        postfix = {
            "outer": f"{sums['outer']:.3f}",
            "qa": f"{sums['qa']:.3f}",
            "kl": f"{sums['kl']:.4f}",
            "val": f"{best['outer']:.3f}",
        }
        bar.set_postfix(postfix)
        out_of_time = time.monotonic() + train_seconds / step + val_seconds > deadline
        if step % cfg.val_every == 0 or step == cfg.steps or out_of_time:
            figures = learner.validate(val_episodes)
            if figures["outer"] < best["outer"]:
                best, best_step = figures, step
                save_best()
        if out_of_time:
            break
    bar.close()
    card.update(
        trained_steps=step,
        skipped_steps=learner.skipped_steps,
        trained_episodes=episodes_done,
        seconds_per_episode=round(train_seconds / max(episodes_done, 1), 3),
        seconds=round(time.monotonic() - started, 1),
    )
    _save_atomically(CamelsWeighter.load(out), out, card)
    return MetaTrainResult(out_dir=out, card=card)
