"""Service configuration: every knob is an `UPTAKE_*` environment variable (CLI flags override)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adaptation.bases import DEFAULT_BASE, PACKAGED, BaseMissing, packaged_base, require_package
from adaptation.mac.system import CONFIG as MAC_CONFIG
from adaptation.modeling import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    cpu_has_native_bf16,
    default_device,
    dtype_named,
)
from adaptation.paths import (
    base_weighter_dir,
    demo_mac_dir,
    demo_model_dir,
    demo_weighter_dir,
    demo_world_dir,
    squad_split_dir,
    uptake_home,
)
from adaptation.prompts import DEFAULT_SELF_EDIT_PROMPT, SELF_EDIT_PROMPTS
from adaptation.updater import UpdateConfig

Mode = Literal["lora", "mac", "seal"]
Strategy = Literal["uniform", "salient", "tfidf", "camels"]
NAMESPACE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Self-edits a document may carry, and a seal-mode worker may write per document.
MAX_SELF_EDITS = 16
# Rehearsal's bounds: steps per document, and documents (texts) kept in every snapshot.
MAX_REHEARSE = 64
MAX_REHEARSAL_WINDOW = 1024


def _named_prompt(name: str) -> str:
    if name not in SELF_EDIT_PROMPTS:
        raise ValueError(
            f"unknown self-edit prompt {name!r}; use one of {', '.join(SELF_EDIT_PROMPTS)}"
        )
    return name


# One of the learning core's named self-edit prompts; the schema lists them.
SelfEditPrompt = Annotated[
    str, AfterValidator(_named_prompt), Field(json_schema_extra={"enum": list(SELF_EDIT_PROMPTS)})
]


class ConfigError(ValueError):
    """Settings a service process cannot start with; the message says what to set."""


def camels_build(base: str) -> str:
    """What to run to build the weighting model `UPTAKE_STRATEGY=camels` reads for a packaged base
    by default: the meta-training command (a body of the base's first layers, the worker's own
    update, a step budget) and the commands that write its data, held out of every evaluation."""
    world, split = demo_world_dir(), squad_split_dir()
    return (
        f"`uptake meta-train camels --base {base} --body {base} --body-layers 4 "
        "--freeze-layers 2 --inner-optimizer adam --inner-lr 2e-3 --episode-docs 2 "
        "--grad-accum 1 --max-doc-tokens 128 --val-episodes 4 --val-every 25 --steps 100 "
        f"--train {split}/tuning.jsonl,{world}/meta_train.jsonl --val {world}/meta_val.jsonl "
        f"--out {base_weighter_dir(base)}`, after `uptake world --out {world}` and "
        f"`uptake squad-split --squad SQUAD_DEV.json --stream STREAM.json --out {split}` "
        "(the files docs/results/real-base-split.json names)"
    )


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """One object shared by the API, the worker and `uptake up`."""

    model_config = SettingsConfigDict(env_prefix="UPTAKE_", extra="ignore")

    # What is learned, and how.
    model: str = Field(
        default=DEFAULT_BASE,
        description=f"base model: a packaged base ({', '.join(PACKAGED)}), converted once under "
        "UPTAKE_HOME, or a local Hugging Face directory or hub id",
    )
    mode: Mode = "lora"
    strategy: Strategy = "uniform"
    weighter: Path | None = Field(
        default=None, description="saved weighter for strategy tfidf or camels"
    )
    mac_dir: Path | None = Field(
        default=None,
        description="trained MAC networks for mode mac (the --out of `uptake meta-train mac`)",
    )
    mac_top_k: int = Field(
        default=0,
        ge=0,
        description="mode mac: each question aggregates only the k bank entries nearest it by "
        "MiniLM embedding (mac+rag); 0: the whole bank",
    )
    mac_min_similarity: float = Field(
        default=-1.0,
        ge=-1.0,
        le=1.0,
        description="mode mac: each question aggregates only bank entries at least this similar "
        "to it (MiniLM cosine), and a question about nothing in the bank reads no memory, so the "
        "base answers it as it would alone; -1: off",
    )
    lr: float = Field(default=1e-3, gt=0)
    steps_per_doc: int = Field(default=1, ge=1)
    normalisation: Literal["tokens", "weights", "fixed"] = "tokens"
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_targets: Annotated[tuple[str, ...], NoDecode] = DEFAULT_TARGET_MODULES
    max_doc_tokens: int = Field(default=1024, ge=8, description="tokens per update chunk")
    chunk_chars: int = Field(default=4000, ge=100, description="long documents split here")
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="the base's weights; auto: bfloat16 on a GPU, and for the worker's "
        "learning on a CPU with AVX-512 BF16 or AMX (faster, same uptake; answers stay float32 "
        "on a CPU: docs/results/cpu-options.md), else float32",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads per process (`uptake up` splits the cores)"
    )

    # Self-edits (mode seal writes them when a document brings none) and source trust.
    self_edit_k: int = Field(
        default=1, ge=1, le=MAX_SELF_EDITS, description="self-edits seal writes per document"
    )
    self_edit_prompt: SelfEditPrompt = Field(
        default=DEFAULT_SELF_EDIT_PROMPT, description="the prompt seal writes self-edits with"
    )
    self_edit_tokens: int = Field(
        default=128, ge=1, le=4096, description="most new tokens in one written self-edit"
    )
    self_edit_best_of: int = Field(
        default=1,
        ge=1,
        le=MAX_SELF_EDITS,
        description="mode seal, above 1: the base writes this many self-edits for a document "
        "sent without any, each is learned from the same state and scored on probe questions "
        "the base writes and answers in context, and only the best is kept (self_edit_k unused)",
    )
    self_edit_cache: Path | None = Field(
        default=None,
        description="mode seal: keep written self-edits and probe questions here, keyed by a "
        "hash of the base, prompt, settings and document, so a replay reads them back; unset: "
        "written anew (seeded, so the same), and nothing derived from a forgotten document "
        "stays on disk",
    )
    default_trust: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="trust of a source no weight was set for (and of no source)",
    )
    source_tags: bool = Field(
        default=False,
        description="experimental (IML): prefix every training sequence with its source's tag",
    )

    # Rehearsal (modes lora and seal): earlier documents learned again, so later ones do not
    # overwrite them; their texts ride in each snapshot.
    rehearse: int = Field(
        default=0,
        ge=0,
        le=MAX_REHEARSE,
        description="earlier documents learned again with each new one (0: off)",
    )
    rehearsal_window: int = Field(
        default=64,
        ge=1,
        le=MAX_REHEARSAL_WINDOW,
        description="the most recent learned documents rehearsal draws from",
    )
    # Micro-batching (mode lora): when documents queue up, a step on a padded micro-batch of
    # several costs less per document than a step each, so the worker keeps up with a faster
    # ingest. Each document then shares its steps, so it gets fewer of its own.
    learn_batch: int = Field(
        default=1,
        ge=1,
        description="queued documents of one namespace learned together in one step, for "
        "throughput when documents queue up, at the cost of fewer steps per document (1: one "
        "by one); only documents of one chunk, without self-edits and of one trust are stacked",
    )

    # Update guard: a version whose probe F1 falls by more than this is held back.
    guard_epsilon: float = Field(default=0.1, ge=0, le=1, description="largest F1 drop allowed")
    guard_probes: Path | None = Field(
        default=None,
        description="dataset (JSONL or JSON) whose questions probe every namespace that has no "
        "probe questions of its own; unset: the guard is off for those",
    )

    # Snapshot cadence: whichever comes first.
    snapshot_every: int = Field(default=8, ge=1, description="documents per snapshot")
    snapshot_seconds: float = Field(default=5.0, gt=0)
    async_snapshots: bool = Field(
        default=True,
        description="write snapshots in a background thread from a copy of the state, so "
        "learning goes on meanwhile (a snapshot of the real base takes about 0.5 s)",
    )

    # Where state lives.
    redis_url: str | None = None
    redis_prefix: str = Field(default="uptake", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    store_dir: Path = Field(default_factory=lambda: uptake_home() / "store")

    # Limits.
    max_doc_chars: int = Field(default=100_000, ge=1)
    max_batch: int = Field(default=64, ge=1)
    max_deliveries: int = Field(default=3, ge=1)

    # Worker coordination.
    worker_id: str = Field(default_factory=_default_worker_id)
    lease_seconds: float = Field(default=15.0, gt=0)
    retry_seconds: float = Field(default=2.0, ge=0, description="wait before retrying a failure")
    poll_seconds: float = Field(default=0.2, gt=0, description="engine's version poll")
    shutdown_seconds: float = Field(default=30.0, gt=0, description="grace for `uptake up`")

    # Answering: concurrent questions share one generate call.
    answer_batch: int = Field(default=32, ge=1, description="most questions per generate call")
    answer_wait_ms: float = Field(
        default=20.0,
        ge=0,
        description="a batch gathers questions while they arrive at most this far apart",
    )

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth: bool = Field(
        default=True,
        description="require API keys (`uptake up` turns this off unless UPTAKE_AUTH is set)",
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="requests per API key per minute (0: no limit)"
    )

    @field_validator("model")
    @classmethod
    def _empty_is_default(cls, value: str) -> str:
        """A deployment file's `UPTAKE_MODEL=` (set, but empty) means the default base."""
        return value or DEFAULT_BASE

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    def apply_torch_threads(self) -> None:
        """Oversubscribed CPU threads thrash (the worker and the API share the cores). Call it
        from the main thread before loading a model."""
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)

    def child_env(self) -> dict[str, str]:
        """This process's environment with these settings as `UPTAKE_*` variables, so a child
        process sees exactly them; the worker id is left out, since each process names itself."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPTAKE_")}
        for name, value in self.model_dump(exclude={"worker_id"}).items():
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            env[f"UPTAKE_{name.upper()}"] = str(value)
        return env

    def torch_dtype(self, serving: bool = False) -> torch.dtype | None:
        """The base's dtype for learning, or for `serving` answers. auto: bfloat16 for learning
        on a CPU that multiplies it in hardware (a LoRA step 1.1 to 1.5x faster, the same
        uptake); float32 for serving on a CPU, where peft's adapter layers make bfloat16
        generation slower (docs/results/cpu-options.md); else the device's default (None)."""
        if self.dtype != "auto":
            return dtype_named(self.dtype)
        on_cpu = (self.device or default_device().type) == "cpu"
        return torch.bfloat16 if on_cpu and not serving and cpu_has_native_bf16() else None

    def lora(self) -> LoraSettings:
        return LoraSettings(
            rank=self.lora_rank, alpha=self.lora_alpha, target_modules=self.lora_targets
        )

    def update(self) -> UpdateConfig:
        return UpdateConfig(
            lr=self.lr, steps_per_doc=self.steps_per_doc, normalisation=self.normalisation
        )

    def adapters_dir(self) -> Path:
        return self.store_dir / "adapters"

    @property
    def uses_demo_model(self) -> bool:
        """Whether the base is the demo model, whose companions `uptake bootstrap` builds (a hub
        model's are the operator's to provide)."""
        return self.model == str(demo_model_dir())

    def mac_networks(self) -> Path:
        """The trained MAC directory that mode mac amortizes and answers with: UPTAKE_MAC_DIR,
        else for the demo model the demo networks `uptake bootstrap` builds."""
        if self.mac_dir is None and not self.uses_demo_model:
            raise ConfigError(
                "UPTAKE_MODE=mac needs UPTAKE_MAC_DIR: the directory written by "
                f"`uptake meta-train mac --base {self.model} --train FILE --val FILE --out DIR`"
            )
        path = self.mac_dir or demo_mac_dir()
        if not (path / MAC_CONFIG).is_file():
            build = (
                "build the demo ones with `uptake bootstrap`"
                if self.mac_dir is None
                else f"train them with `uptake meta-train mac --base {self.model} --train FILE "
                f"--val FILE --out {path}`, or point UPTAKE_MAC_DIR at such a directory"
            )
            where = f"UPTAKE_MAC_DIR={path}" if self.mac_dir else f"the demo MAC directory {path}"
            raise ConfigError(f"{where} holds no trained MAC networks (no {MAC_CONFIG}); {build}")
        return path

    def weighter_path(self) -> Path | None:
        """The saved weighter the strategy reads: UPTAKE_WEIGHTER, else for camels the weighting
        model meta-trained against the packaged base, or for any other base the demo one
        `uptake bootstrap` builds (its weights are per character, so any base can use it); None
        for the strategies that need none."""
        if self.strategy in ("uniform", "salient"):
            return None
        if self.weighter is not None:
            if not self.weighter.exists():
                raise ConfigError(f"UPTAKE_WEIGHTER={self.weighter} does not exist")
            return self.weighter
        if self.strategy == "tfidf":
            raise ConfigError(
                "UPTAKE_STRATEGY=tfidf needs UPTAKE_WEIGHTER: the JSON file written by "
                "`uptake fit-tfidf DOCUMENTS --out FILE`"
            )
        packaged = packaged_base(self.model)
        if packaged is not None:
            path = base_weighter_dir(packaged.name)
            if not path.is_dir():
                raise ConfigError(
                    f"UPTAKE_STRATEGY=camels found no weighting model for {packaged.name} at "
                    f"{path}; build it with {camels_build(packaged.name)}; or set "
                    "UPTAKE_WEIGHTER to a weighting model directory (the demo one, from "
                    f"`uptake bootstrap`, is {demo_weighter_dir()})"
                )
            return path
        if not demo_weighter_dir().is_dir():
            raise ConfigError(
                f"UPTAKE_STRATEGY=camels found no weighting model: the demo one "
                f"({demo_weighter_dir()}) is built by `uptake bootstrap`; or set UPTAKE_WEIGHTER "
                "to the --out of "
                f"`uptake meta-train camels --base {self.model} --train FILE --val FILE --out DIR`"
            )
        return demo_weighter_dir()

    def check(self) -> None:
        """Stop a process at start, not at its first document or question, when its mode or
        strategy lacks what it needs, or its packaged base lacks its package."""
        try:
            require_package(self.model)
        except BaseMissing as exc:
            raise ConfigError(str(exc)) from None
        self.weighter_path()
        if self.mode == "mac":
            self.mac_networks()
