"""The serving engine: one base model, each namespace's newest adapter, hot-swapped.

A background thread polls Redis for published versions. A new version is checked against its
checksum and swapped in while holding the same lock that generation holds: its weights are
copied into the namespace's adapter when it has the same shape (read from disk before taking the
lock), else it is loaded under a fresh adapter name and the old one deleted. So an answer never
sees a half-loaded adapter, and every answer reports the version it came from. Mode mac's engine
(`MacServingEngine`) reuses the polling, checks and batching, and swaps memory banks
(service/backends/mac.py) instead of adapters.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from peft import LoraConfig, PeftConfig, PeftModel, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from adaptation.answering import generate_answers, generate_batched
from adaptation.mac.system import MacSystem
from adaptation.mixed_lora import adapters_by_row, sliceable
from adaptation.modeling import RNG_LOCK, context_window, load_base
from adaptation.prompts import Message, chat_prompt, clean_answer, last_question, qa_prompt
from service.adapters import AdapterStore, published_versions
from service.backends.mac import MacModels
from service.batching import AnswerBatcher
from service.keys import Keys
from service.settings import Settings
from service.streaming import Streamed

log = logging.getLogger(__name__)


# peft's name for "no adapter" in a mixed batch.
BASE_ADAPTER = "__base__"


class PromptTooLong(ValueError):
    """The prompt alone fills the model's context window."""


@dataclass(frozen=True)
class Reply:
    """A generated text, the adapter version that wrote it, and its tokens (what the OpenAI
    routes report as usage)."""

    text: str
    version: int
    prompt_tokens: int
    completion_tokens: int


class ServingEngine:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        keys: Keys,
        store: AdapterStore,
        on_switch: Callable[[str, int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.keys = keys
        self.store = store
        self.on_switch = on_switch
        self.on_batch = on_batch
        self.error: str | None = None
        self._base: PreTrainedModel | None = None
        self._peft: PeftModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # Request threads count prompt tokens while the batcher generates: a fast tokenizer's
        # padding state is shared, so counting uses its own copy under its own lock.
        self._counter: PreTrainedTokenizerBase | None = None
        self._counter_lock = threading.Lock()
        self._adapters: dict[str, tuple[int, str]] = {}  # namespace -> (version, adapter name)
        self._rejected: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batcher = AnswerBatcher(
            self._answer_batch, settings.answer_batch, settings.answer_wait_ms / 1000
        )

    @property
    def ready(self) -> bool:
        return self._base is not None

    def start(self) -> None:
        """Load the model and follow published versions, in the background."""
        self._thread = threading.Thread(target=self._run, name="uptake-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._batcher.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def load(self) -> None:
        model, tokenizer = load_base(
            self.settings.model, self.settings.device, self.settings.torch_dtype(serving=True)
        )
        model.requires_grad_(False)
        self._tokenizer = tokenizer
        self._counter = copy.deepcopy(tokenizer)
        self._base = model
        log.info("engine: model %s loaded on %s", self.settings.model, model.device)

    def version(self, namespace: str) -> int:
        return self._adapters.get(namespace, (0, ""))[0]

    def versions(self) -> dict[str, int]:
        return {ns: v for ns, (v, _) in self._adapters.items()}

    def refresh(self) -> None:
        """Load any newly published version (a no-op when nothing changed)."""
        for ns, version in published_versions(self.redis, self.keys).items():
            if version != self.version(ns) and (ns, version) not in self._rejected:
                self._switch(ns, version)

    def answer(self, question: str, namespace: str, max_new_tokens: int) -> tuple[str, int]:
        """A closed-book answer in the QA format, and the adapter version it came from.
        Concurrent calls are answered together in micro-batches."""
        text, version, _ = self._ask(question, namespace, max_new_tokens)
        return text, version

    def _ask(self, question: str, namespace: str, max_new_tokens: int) -> tuple[str, int, int]:
        """The answer, its version, and the prompt's tokens."""
        prompt = qa_prompt(self._loaded_tokenizer(), question)
        budget, used = self._fit_context(prompt, max_new_tokens, "question")
        return *self._batcher.answer(question, namespace, budget), used

    def chat(self, messages: list[Message], namespace: str, max_new_tokens: int) -> Reply:
        """The next assistant turn of a conversation, in the base's chat template, to the end of
        its turn or first line."""
        prompt = chat_prompt(self._loaded_tokenizer(), messages)
        budget, used = self._fit_context(prompt, max_new_tokens, "conversation")
        (text,), version = self._generate(
            namespace,
            lambda model, tok: [
                clean_answer(t) for t in generate_batched(model, tok, [prompt], budget)
            ],
        )
        return Reply(text, version, used, self.count_tokens(text))

    def stream_chat(self, messages: list[Message], namespace: str, max_new_tokens: int) -> Streamed:
        """`chat`, handed over piece by piece as it is generated."""
        prompt = chat_prompt(self._loaded_tokenizer(), messages)
        budget, used = self._fit_context(prompt, max_new_tokens, "conversation")
        return self._stream(prompt, namespace, budget, used, cut_at_answer_end=True)

    def stream_complete(self, prompt: str, namespace: str, max_new_tokens: int) -> Streamed:
        """`complete`, handed over piece by piece as it is generated."""
        budget, used = self._fit_context(prompt, max_new_tokens, "prompt")
        return self._stream(prompt, namespace, budget, used, cut_at_answer_end=False)

    def _stream(
        self, prompt: str, namespace: str, budget: int, used: int, cut_at_answer_end: bool
    ) -> Streamed:
        def generate(streamer: TextIteratorStreamer) -> int:
            _, version = self._generate(
                namespace,
                lambda model, tok: generate_batched(
                    model, tok, [prompt], budget, streamer=streamer
                ),
            )
            return version

        return Streamed(
            generate, self._loaded_tokenizer(), used, self.count_tokens, cut_at_answer_end
        )

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`, counted on the request thread's own tokenizer copy."""
        if self._counter is None:
            raise RuntimeError("the model is not loaded yet")
        with self._counter_lock:
            return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def _answer_batch(self, asks: list[tuple[str, str]], budget: int) -> list[tuple[str, int]]:
        """One generate call for questions from any namespaces, each row through its namespace's
        adapter (the base where none is published)."""
        assert self._base is not None and self._tokenizer is not None
        if self.on_batch is not None:
            self.on_batch(len(asks))
        with self._lock:
            served = [self._adapters.get(ns, (0, "")) for ns, _ in asks]
            # Rows sorted by adapter: each adapter's rows are then one slice of the batch.
            order = sorted(range(len(asks)), key=lambda i: served[i][1])
            with self._routed([served[i][1] for i in order]) as (model, extra):
                texts = generate_answers(
                    model,
                    self._tokenizer,
                    [asks[i][1] for i in order],
                    max_new_tokens=budget,
                    batch_size=len(asks),
                    **extra,
                )
        answers = dict(zip(order, texts, strict=True))
        return [(answers[i], version) for i, (version, _) in enumerate(served)]

    @contextmanager
    def _routed(self, names: list[str]) -> Iterator[tuple[PreTrainedModel, dict[str, Any]]]:
        """The model (and generate's extra arguments) that runs each row through its adapter
        ("" for the base); the caller holds the swap lock. A batch of one adapter, or of none,
        runs with that adapter active or with adapters off. A mixed batch runs each adapter on
        its slice of rows (`adapters_by_row`, rows sorted by the caller), or, for adapters that
        are not plain LoRA, through peft's mixed-batch routing, which is slower."""
        assert self._base is not None
        if self._peft is None:
            yield self._base, {}
            return
        self._peft.eval()
        if len(set(names)) > 1 and sliceable(self._peft):
            with adapters_by_row(self._peft, names) as model:
                yield model, {}
        elif len(set(names)) > 1:
            yield self._peft, {"adapter_names": [name or BASE_ADAPTER for name in names]}
        elif names[0]:
            self._peft.set_adapter(names[0])
            yield self._peft, {}
        else:
            with self._peft.disable_adapter():
                yield self._peft, {}

    def complete(self, prompt: str, namespace: str, max_new_tokens: int) -> Reply:
        """A raw greedy continuation of `prompt` (to the end of its line)."""
        budget, used = self._fit_context(prompt, max_new_tokens, "prompt")
        (text,), version = self._generate(
            namespace,
            lambda model, tok: generate_batched(model, tok, [prompt], max_new_tokens=budget),
        )
        return Reply(text, version, used, self.count_tokens(text))

    def _generate(
        self,
        namespace: str,
        run: Callable[[PreTrainedModel, PreTrainedTokenizerBase], list[str]],
    ) -> tuple[list[str], int]:
        """Run generation with the namespace's adapter active (or none), under the swap lock."""
        assert self._tokenizer is not None
        with self._lock:
            version, name = self._adapters.get(namespace, (0, ""))
            with self._routed([name]) as (model, _):
                return run(model, self._tokenizer), version

    def _loaded_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("the model is not loaded yet")
        return self._tokenizer

    def _fit_context(self, prompt: str, max_new_tokens: int, what: str) -> tuple[int, int]:
        """The answer budget, shortened so prompt plus answer fit the model's positions, and the
        prompt's tokens."""
        if self._base is None:
            raise RuntimeError("the model is not loaded yet")
        used = self.count_tokens(prompt)
        limit = context_window(self._base)
        if not limit:
            return max_new_tokens, used
        if used >= limit:
            raise PromptTooLong(
                f"the {what} takes {used} tokens but the model reads at most {limit}; "
                f"send a shorter {what}"
            )
        return min(max_new_tokens, limit - used), used

    def _run(self) -> None:
        try:
            self.load()
        except Exception as exc:  # surfaced through /readyz rather than a dead thread
            log.exception("engine: could not load %s", self.settings.model)
            self.error = f"could not load model {self.settings.model}: {exc}"
            return
        while not self._stop.is_set():
            try:
                self.refresh()
            except redis.RedisError as exc:
                log.debug("engine: Redis unreachable (%s); serving what is loaded", exc)
            self._stop.wait(self.settings.poll_seconds)

    def _switch(self, namespace: str, version: int) -> None:
        started = time.perf_counter()
        path = self.store.path(namespace, version) if version else None
        if path is not None and not self.store.verify(namespace, version):
            log.error(
                "engine: %s fails its checksum or is missing; keeping version %d",
                path,
                self.version(namespace),
            )
            self._rejected.add((namespace, version))
            return
        checked = time.perf_counter()
        try:
            self._install(namespace, version, path)
        except Exception:  # a snapshot this replica cannot load must not stop it following others
            log.exception(
                "engine: could not load %s; keeping version %d", path, self.version(namespace)
            )
            self._rejected.add((namespace, version))
            return
        log.info(
            "engine: %s now serves version %d (checked in %.2f s, swapped in in %.2f s)",
            namespace,
            version,
            checked - started,
            time.perf_counter() - checked,
        )
        if self.on_switch is not None:
            self.on_switch(namespace, version)

    def _install(self, namespace: str, version: int, path: Path | None) -> None:
        """Serve `namespace` from the verified snapshot at `path` (None: the bare base), swapped
        in under the lock that generation holds. A version shaped like the one served is read
        outside the lock and copied into the served adapter's weights, so the lock is held for
        milliseconds; another shape is loaded under a fresh name (peft builds its layers, which
        takes about a second on a CPU). Modes other than lora override this."""
        _, old = self._adapters.get(namespace, (0, ""))
        if path is not None and old and self._peft is not None:
            config = LoraConfig.from_pretrained(str(path))
            if _same_shape(config, self._peft.peft_config[old]):
                weights = load_file(str(path / SAFETENSORS_WEIGHTS_NAME))
                with self._lock:
                    set_peft_model_state_dict(self._peft, weights, adapter_name=old)
                    self._adapters[namespace] = (version, old)
                return
        name = f"{namespace}-v{version}" if path is not None else ""
        # Loading initialises the adapter at random first: RNG_LOCK keeps that from drawing
        # while a worker in this process (in tests) seeds the generator.
        with self._lock, RNG_LOCK:
            if name and self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=name)
            elif name:
                self._peft.load_adapter(str(path), adapter_name=name)
            if name:
                self._peft.set_adapter(name)
            self._adapters[namespace] = (version, name)
            if old and self._peft is not None:
                self._peft.delete_adapter(old)
            if self._peft is not None:
                self._peft.eval()


def _same_shape(new: PeftConfig, served: PeftConfig) -> bool:
    """Whether `new`'s weights fit the layers built for `served` (only the mode flag differs)."""

    def shape(config: PeftConfig) -> dict[str, Any]:
        return {k: v for k, v in config.to_dict().items() if k != "inference_mode"}

    return shape(new) == shape(served)


class MacServingEngine(ServingEngine):
    """The serving engine of mode mac: each namespace answers from its published bank, with no
    adapter. A micro-batch is answered with one generate call per namespace in it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mac: MacModels | None = None
        self._empty: MacSystem | None = None  # namespaces with nothing published: the bare base
        self._banks: dict[str, tuple[int, MacSystem]] = {}  # namespace -> (version, system)

    @property
    def ready(self) -> bool:
        return self._mac is not None

    def load(self) -> None:
        directory = self.settings.mac_networks()
        super().load()
        assert self._base is not None and self._tokenizer is not None
        mac = MacModels(
            self._base,
            self._tokenizer,
            directory,
            self.settings.mac_top_k,
            self.settings.mac_min_similarity,
        )
        self._empty = mac.system(None)
        self._mac = mac

    def version(self, namespace: str) -> int:
        return self._banks.get(namespace, (0, None))[0]

    def versions(self) -> dict[str, int]:
        return {ns: version for ns, (version, _) in self._banks.items()}

    def _install(self, namespace: str, version: int, path: Path | None) -> None:
        assert self._mac is not None
        system = self._mac.system(path)  # read the bank before taking the lock answers hold
        with self._lock:
            self._banks[namespace] = (version, system)

    def _served(self, namespace: str) -> tuple[int, MacSystem]:
        assert self._empty is not None
        return self._banks.get(namespace) or (0, self._empty)

    def _answer_batch(self, asks: list[tuple[str, str]], budget: int) -> list[tuple[str, int]]:
        if self.on_batch is not None:
            self.on_batch(len(asks))
        rows: dict[str, list[int]] = {}
        for i, (namespace, _) in enumerate(asks):
            rows.setdefault(namespace, []).append(i)
        out: list[tuple[str, int]] = [("", 0)] * len(asks)
        with self._lock:
            for namespace, indices in rows.items():
                version, system = self._served(namespace)
                questions = [asks[i][1] for i in indices]
                texts = system.answer(questions, max_new_tokens=budget, batch_size=len(questions))
                for i, text in zip(indices, texts, strict=True):
                    out[i] = (text, version)
        return out

    def chat(self, messages: list[Message], namespace: str, max_new_tokens: int) -> Reply:
        """The bank is read with a question: the last user message is asked."""
        text, version, used = self._ask(last_question(messages), namespace, max_new_tokens)
        return Reply(text, version, used, self.count_tokens(text))

    def complete(self, prompt: str, namespace: str, max_new_tokens: int) -> Reply:
        budget, used = self._fit_context(prompt, max_new_tokens, "prompt")
        with self._lock:
            version, system = self._served(namespace)
            (text,) = system.complete([prompt], budget)
        return Reply(text, version, used, self.count_tokens(text))

    def stream_chat(self, messages: list[Message], namespace: str, max_new_tokens: int) -> Streamed:
        """A bank answers a batch at a time: the whole reply comes as one piece."""
        return self._in_one_piece(self.chat(messages, namespace, max_new_tokens))

    def stream_complete(self, prompt: str, namespace: str, max_new_tokens: int) -> Streamed:
        return self._in_one_piece(self.complete(prompt, namespace, max_new_tokens))

    def _in_one_piece(self, reply: Reply) -> Streamed:
        def generate(streamer: TextIteratorStreamer) -> int:
            streamer.on_finalized_text(reply.text, stream_end=True)
            return reply.version

        return Streamed(
            generate, self._loaded_tokenizer(), reply.prompt_tokens, self.count_tokens, False
        )


def open_engine(
    settings: Settings,
    client: redis.Redis,
    keys: Keys,
    store: AdapterStore,
    on_switch: Callable[[str, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ServingEngine:
    """The serving engine for the service's mode."""
    engine = MacServingEngine if settings.mode == "mac" else ServingEngine
    return engine(settings, client, keys, store, on_switch=on_switch, on_batch=on_batch)
