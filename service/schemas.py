"""Request and response bodies of the HTTP API. Validation messages are written for people."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    field_validator,
)

from adaptation.trust import check_weight
from service.documents import Status
from service.settings import (
    MAX_REHEARSAL_WINDOW,
    MAX_REHEARSE,
    MAX_SELF_EDITS,
    NAMESPACE_PATTERN,
    Mode,
    SelfEditPrompt,
    Settings,
    Strategy,
)

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_NEW_TOKENS = 512
MAX_PROBES = 200
MAX_METADATA_DEPTH = 32
MAX_METADATA_BYTES = 64 * 1024
Namespace = Annotated[
    str,
    Field(pattern=NAMESPACE_PATTERN, description="letters, digits, '_' or '-' (1-64)"),
]
DocStatus = Status


def _utf8(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 ({exc.reason}); send UTF-8 text") from exc
    return value


def _content(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty or only whitespace; send some text")
    return _utf8(value, what)


def json_depth(value: object) -> int:
    """How deeply objects and arrays nest in a JSON value, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Metadata is stored and echoed back as JSON: bound its nesting (serialising it recurses)
    and size, and refuse what strict JSON cannot carry (NaN, Infinity, lone surrogates)."""
    if json_depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(
            f"metadata nests objects and arrays more than {MAX_METADATA_DEPTH} levels deep; "
            "flatten it"
        )
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise ValueError(
            "metadata holds NaN or Infinity, which JSON cannot carry; send numbers or strings"
        ) from exc
    size = len(_utf8(encoded, "metadata").encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata is {size:,} bytes of JSON, over the limit of {MAX_METADATA_BYTES:,}; "
            "keep bulky data in the text or elsewhere"
        )
    return value


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, pattern=r"\S", description="the document's content")
    id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="defaults to a hash of namespace, text and self_edits",
    )
    source: str | None = Field(
        default=None,
        max_length=2048,
        description="who sent it; the namespace's trust in this source scales how strongly it is "
        "learned (PUT /v1/namespaces/{ns}/sources/{source})",
    )
    namespace: Namespace = "default"
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="kept with the document; a string `title` heads each self-edit sequence",
    )
    self_edits: list[Annotated[str, Field(min_length=1, pattern=r"\S")]] = Field(
        default_factory=list,
        max_length=MAX_SELF_EDITS,
        description="training text about the document (implications, rewrites, question and "
        "answer pairs), learned with it in modes lora and seal (mode mac learns the text only); "
        "each is split into sequences at blank lines, rules and list items. Part of the "
        "content: the same text with other self-edits is another document. Each is held to the "
        "text's size limit",
    )

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        return _content(value, "text") if isinstance(value, str) else value

    @field_validator("self_edits", mode="before")
    @classmethod
    def _self_edits(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        return [
            _content(edit, f"self_edits[{i}]") if isinstance(edit, str) else edit
            for i, edit in enumerate(value)
        ]

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        return _utf8(value, "source") if value is not None else None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _metadata(value)


class DocumentBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1)


def _body_kind(value: object) -> str:
    return "batch" if isinstance(value, dict) and "documents" in value else "single"


DocumentsIn = Annotated[
    Annotated[DocumentIn, Tag("single")] | Annotated[DocumentBatchIn, Tag("batch")],
    Discriminator(_body_kind),
]


class DocumentAccepted(BaseModel):
    id: str
    status: DocStatus
    namespace: str


class DocumentsAccepted(BaseModel):
    documents: list[DocumentAccepted]


class DocumentOut(BaseModel):
    id: str
    namespace: str
    status: DocStatus
    adapter_version: int | None = None
    error: str | None = None
    attempts: int = Field(
        description="attempts that failed or were cut off by a worker crash; one that learned the "
        "document is not counted. At UPTAKE_MAX_DELIVERIES the document is dead-lettered."
    )
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    self_edits: int = Field(default=0, description="how many self-edits came with it")
    trust: float | None = Field(
        default=None,
        description="the source trust its update was scaled by, fixed when it was first learned "
        "(a forget's replay reuses it); null until then, and in mode mac, which ignores trust",
    )
    sequences: int | None = Field(
        default=None,
        description="training sequences it was learned from: its text's chunks and its "
        "self-edit sequences (0 when trust is 0)",
    )
    self_edit_sequences: int | None = Field(
        default=None,
        description="of those, the self-edit sequences: parsed from the supplied self-edits, or "
        "written by the model in mode seal",
    )
    note: str | None = Field(
        default=None, description="why a document recorded as applied changed nothing"
    )
    created: float = Field(description="when it was accepted (Unix seconds)")
    learned: float | None = Field(
        default=None, description="when a worker last learned it (Unix seconds); null until then"
    )
    updated: float = Field(description="when its status last changed (Unix seconds)")


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=4000, pattern=r"\S")
    namespace: Namespace = "default"
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)
    wait_for: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(
        default_factory=list,
        max_length=1000,
        description="document ids the answer must already reflect (read-your-writes)",
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="how long to wait_for")

    @field_validator("question", mode="before")
    @classmethod
    def _question(cls, value: object) -> object:
        return _content(value, "question") if isinstance(value, str) else value


class AnswerOut(BaseModel):
    answer: str
    adapter_version: int
    namespace: str
    latency_ms: float


class Probe(BaseModel):
    """A question the update guard asks before publishing, with the answers it accepts."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=1000, pattern=r"\S")
    answers: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        min_length=1, max_length=16, description="accepted answers; F1 takes the best match"
    )

    @field_validator("question", mode="before")
    @classmethod
    def _question(cls, value: object) -> object:
        return _content(value, "question") if isinstance(value, str) else value

    @field_validator("answers")
    @classmethod
    def _answers(cls, value: list[str]) -> list[str]:
        return [_utf8(a, "an answer") for a in value]


def _not_bool(value: object) -> object:
    """JSON true/false is not a number, though pydantic would read it as 1/0."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


NOT_BOOL = BeforeValidator(_not_bool)


def _trust(value: object) -> float:
    """The learning core's own check: a number in [0, 1], not true/false and not a string."""
    return check_weight(value, "trust")


# How strongly a source's documents are learned: 0 not at all, 1 fully.
Trust = Annotated[float, Field(ge=0, le=1), BeforeValidator(_trust)]


class NamespaceConfig(BaseModel):
    """A namespace's own settings. A field left out (or null) follows the service's `UPTAKE_*`
    default, so a namespace keeps tracking the deployment until it chooses otherwise."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = Field(
        default=None,
        description="how documents are learned; the schema lists what this deployment's worker runs",
    )
    strategy: Strategy | None = Field(
        default=None, description="token weighting; the schema lists what this deployment has"
    )
    lr: Annotated[float, Field(gt=0, le=1), NOT_BOOL] | None = Field(
        default=None, description="AdamW learning rate"
    )
    steps_per_doc: Annotated[int, Field(ge=1, le=64), NOT_BOOL] | None = None
    guard_epsilon: Annotated[float, Field(ge=0, le=1), NOT_BOOL] | None = Field(
        default=None,
        description="largest drop in probe F1 a new version may cause before it is held back",
    )
    probes: list[Probe] = Field(
        default_factory=list,
        max_length=MAX_PROBES,
        description="questions the update guard asks before each version is published; none: "
        "the service's UPTAKE_GUARD_PROBES, and without those the guard is off",
    )
    self_edit_k: Annotated[int, Field(ge=1, le=MAX_SELF_EDITS), NOT_BOOL] | None = Field(
        default=None,
        description="mode seal: self-edits the model writes for a document sent without any",
    )
    self_edit_prompt: SelfEditPrompt | None = Field(
        default=None, description="mode seal: the prompt the model writes self-edits with"
    )
    self_edit_tokens: Annotated[int, Field(ge=1, le=4096), NOT_BOOL] | None = Field(
        default=None, description="mode seal: most new tokens in one written self-edit"
    )
    default_trust: Trust | None = Field(
        default=None,
        description="trust of sources without a weight of their own, and of documents without a "
        "source (the service's default is 1)",
    )
    source_tags: bool | None = Field(
        default=None,
        description="experimental (IML): prefix every training sequence with a tag derived from "
        "its document's source, so the model can learn which tags to believe",
    )

    rehearse: Annotated[int, Field(ge=0, le=MAX_REHEARSE), NOT_BOOL] | None = Field(
        default=None,
        description="modes lora and seal: earlier documents learned again with each new one, "
        "so later documents do not overwrite them (0: off)",
    )
    rehearsal_window: Annotated[int, Field(ge=1, le=MAX_REHEARSAL_WINDOW), NOT_BOOL] | None = Field(
        default=None,
        description="modes lora and seal: the most recent learned documents rehearsal draws "
        "from; their texts are kept in every snapshot",
    )

    def apply(self, settings: Settings) -> Settings:
        """The service settings with this namespace's choices in place."""
        return settings.model_copy(update=self.model_dump(exclude={"probes"}, exclude_none=True))


class EffectiveSettings(BaseModel):
    mode: str
    strategy: str
    lr: float
    steps_per_doc: int
    guard_epsilon: float
    probes: Literal["namespace", "service", "none"] = Field(
        description="where the guard's probe questions come from: this namespace's own, the "
        "service's UPTAKE_GUARD_PROBES, or none (the guard is off)"
    )
    self_edit_k: int
    self_edit_prompt: str
    self_edit_tokens: int
    default_trust: float
    source_tags: bool
    rehearse: int
    rehearsal_window: int


OperationName = Literal["configure", "rollback", "forget"]


class Operation(BaseModel):
    """An admin operation queued for the worker that owns the namespace."""

    request: str = Field(description="the operation's id; it leaves pending_operations when done")
    namespace: str
    operation: OperationName
    version: int | None = Field(default=None, description="rollback: the version restored")
    document: str | None = Field(default=None, description="forget: the document's id")


class NamespaceOut(BaseModel):
    namespace: str
    config: NamespaceConfig
    effective: EffectiveSettings
    published_version: int
    pending_operations: list[Operation]


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(
        ge=0, description="an existing version (0: the bare base model); see GET /v1/adapters"
    )


class SourceTrustIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trust: Trust = Field(
        description="how strongly this source's documents are learned: the update is scaled by "
        "it (0: recorded but not learned, 1: fully)"
    )


class SourcesOut(BaseModel):
    default: float = Field(description="the namespace's default_trust, for every other source")
    sources: dict[str, float] = Field(description="the sources with a trust weight of their own")


class ManifestOut(BaseModel):
    version: int
    parent: int
    namespace: str
    doc_ids: list[str]
    lineage_size: int
    created: float
    checksum: str
    info: dict[str, Any] = Field(default_factory=dict)


class AdaptersOut(BaseModel):
    namespace: str
    serving_version: int
    versions: list[ManifestOut]


class WorkerProblem(BaseModel):
    reason: str
    since: float = Field(description="Unix time of the first failure in this run of failures")


class StatusOut(BaseModel):
    namespace: str
    queue_length: int = Field(description="documents not yet acknowledged (waiting + in flight)")
    pending: int = Field(description="documents delivered to a worker, not yet acknowledged")
    dead_letters: int
    published_version: int
    serving_version: int
    documents_applied: int = Field(description="documents in the lineage of the newest snapshot")
    state_bytes: int = Field(
        description="the newest snapshot on disk: LoRA adapter and optimizer state (a fixed "
        "size), or the memory bank (one entry per document, in mode mac)"
    )
    bank_entries: int | None = Field(
        default=None,
        description="mode mac: documents in the newest snapshot's memory bank; null in other "
        "modes and before the first snapshot",
    )
    bytes_per_document: int | None = Field(
        default=None,
        description="mode mac: what each document adds to the bank on disk (its T x d fp16 "
        "modulation and its fp16 retrieval key); null in other modes and before the first "
        "snapshot",
    )
    quarantined: list[str] = Field(
        default_factory=list,
        description="damaged snapshots the worker moved aside (.quarantine/vNNNNNN-reason); "
        "their documents were queued again",
    )
    worker_problem: WorkerProblem | None = Field(
        default=None,
        description="why the worker cannot currently make progress on this namespace (such as a "
        "snapshot it cannot write: disk full, permissions); its documents stay queued and are "
        "retried every second. null when all is well",
    )
    model: str
    mode: str
    strategy: str


class Problem(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    reasons: list[str] = Field(default_factory=list)


# OpenAI-compatible surface: `model` names the namespace whose knowledge answers.


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = Field(
        default=False, description="end the stream with a chunk that holds only the usage"
    )


class Streaming(BaseModel):
    """What a client asks of a streamed reply (OpenAI's `stream` and `stream_options`)."""

    model_config = ConfigDict(extra="ignore")  # clients send sampling options we do not use

    stream: StrictBool = Field(
        default=False, description="answer as server-sent events, one chunk per piece of text"
    )
    stream_options: StreamOptions | None = None


class CompletionIn(Streaming):
    model: Namespace = "default"
    prompt: str = Field(min_length=1, max_length=16000, pattern=r"\S")
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: object) -> object:
        return _content(value, "prompt") if isinstance(value, str) else value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(max_length=16000)

    @field_validator("content")
    @classmethod
    def _content_utf8(cls, value: str) -> str:
        return _utf8(value, "content")


class ChatIn(Streaming):
    model: Namespace = "default"
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = "stop"


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage = Field(default_factory=Usage)
    adapter_version: int


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatChunk(BaseModel):
    """One server-sent event of a streamed chat reply."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    adapter_version: int | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    adapter_version: int | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatReply
    finish_reason: str = "stop"


class ChatOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(default_factory=Usage)
    adapter_version: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "uptake"
    adapter_version: int
    base_model: str = Field(description="the base model every namespace's knowledge adapts")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
