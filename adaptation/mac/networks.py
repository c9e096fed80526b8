"""Everything MAC trains, under one config: amortizer, aggregator (with its question encoder) and
the prefix projector. The base model is not part of it and stays frozen: an encoder that reads
with the base gets the base's hidden states, computed without gradient, from the base the
networks are bound to (`bind`), which is never one of their modules, so it is neither saved with
them nor trained."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from adaptation.mac.aggregator import Aggregator, AggregatorConfig
from adaptation.mac.amortizer import Amortizer, EncoderConfig
from adaptation.mac.injection import PrefixKV, PrefixProjector, PrefixShape


@dataclass(frozen=True)
class MacConfig:
    amortizer: EncoderConfig
    question: EncoderConfig
    aggregator: AggregatorConfig
    prefix: PrefixShape
    projector_hidden: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.amortizer.num_tokens

    @property
    def width(self) -> int:
        return self.prefix.width

    @classmethod
    def for_base(
        cls,
        model: PreTrainedModel,
        vocab_size: int | None = None,
        *,
        width: int = 256,
        layers: int = 2,
        query_layers: int = 2,
        heads: int = 4,
        num_tokens: int = 16,
        max_length: int = 256,
        question_length: int = 64,
        question_layers: int = 1,
        aggregator_blocks: int = 4,
        window: int = 32,
        chunk: int = 32,
        dropout: float = 0.0,
        encoder: Literal["own", "base"] = "own",
        question_encoder: Literal["own", "base"] | None = None,
        encoder_layer: int = -1,
    ) -> MacConfig:
        """Networks sized for `model`. `vocab_size` is the encoder tokenizer's; None means the
        base's own tokenizer (the base's embedding rows). Questions are short, so their encoder
        is shallower than the documents'. `encoder` says what reads the documents (`own` small
        encoder or the frozen `base` at hidden state `encoder_layer`), `question_encoder` the
        questions (None: the same)."""
        shape = PrefixShape.of(model)
        if encoder == "base" or question_encoder == "base":
            vocab_size = None  # the base reads with its own tokenizer
        vocab_size = vocab_size or model.get_input_embeddings().num_embeddings
        document = EncoderConfig(
            vocab_size=vocab_size,
            out_width=shape.width,
            width=width,
            layers=layers,
            query_layers=query_layers,
            heads=heads,
            num_tokens=num_tokens,
            max_length=max_length,
            dropout=dropout,
            reads=encoder,
            base_layer=encoder_layer,
        )
        return cls(
            amortizer=document,
            question=dataclasses.replace(
                document,
                max_length=question_length,
                layers=question_layers,
                query_layers=1,
                reads=question_encoder or encoder,
            ),
            aggregator=AggregatorConfig(
                width=shape.width,
                blocks=aggregator_blocks,
                window=window,
                chunk=chunk,
                dropout=dropout,
            ),
            prefix=shape,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MacConfig:
        return cls(
            amortizer=EncoderConfig(**raw["amortizer"]),
            question=EncoderConfig(**raw["question"]),
            aggregator=AggregatorConfig(**raw["aggregator"]),
            prefix=PrefixShape(**raw["prefix"]),
            projector_hidden=raw.get("projector_hidden"),
        )


class MacNetworks(nn.Module):
    def __init__(self, config: MacConfig) -> None:
        super().__init__()
        self.config = config
        self.amortizer = Amortizer(config.amortizer)
        self.aggregator = Aggregator(config.aggregator, config.question)
        self.projector = PrefixProjector(
            config.prefix, config.question.num_tokens, config.projector_hidden
        )
        self._base: list[PreTrainedModel] = []  # a list, so the base is no submodule

    @property
    def reads_base(self) -> bool:
        return self.config.amortizer.reads_base or self.config.question.reads_base

    def bind(self, model: PreTrainedModel) -> None:
        """The frozen base that encoders reading with the base run (needed only by those)."""
        self._base[:] = [model]

    @torch.no_grad()
    def _base_hidden(
        self, config: EncoderConfig, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The bound base's hidden states [B, S, d] at the encoder's layer, without gradient;
        None for an encoder of its own. The base's body runs alone: no logits are computed."""
        if not config.reads_base:
            return None
        if not self._base:
            raise RuntimeError("these MAC networks read with the base: bind() it first")
        body = self._base[0].base_model
        out = body(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
        return out.hidden_states[config.base_layer].detach()

    def init_from_base(self, model: PreTrainedModel) -> bool:
        """Seed both encoders' token embeddings from the base's, when they share its vocabulary
        (the default: the encoders read with the base's tokenizer). True if it did; an encoder that
        reads with the base has no table to seed."""
        table = model.get_input_embeddings().weight
        if table.shape[0] != self.config.amortizer.vocab_size:
            return False
        self.amortizer.init_embeddings(table)
        self.aggregator.question.init_embeddings(table)
        return not (self.config.amortizer.reads_base and self.config.question.reads_base)

    def modulate(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Documents [N, S] -> modulations [N, T, d]."""
        hidden = self._base_hidden(self.config.amortizer, input_ids, mask)
        return self.amortizer(input_ids, mask, hidden)

    def prefix(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> PrefixKV:
        """Questions [B, S] over memory [1 or B, N, T, d] -> the prefix each question reads."""
        hidden = self._base_hidden(self.config.question, question_ids, question_mask)
        queries = self.aggregator.queries(question_ids, question_mask, hidden)
        modulation, present = self.aggregator(queries, memory.to(queries.dtype), memory_mask)
        return self.projector(modulation, present)
