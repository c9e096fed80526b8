"""Replies that arrive in pieces, for `stream: true` on the OpenAI-compatible routes.

A streamed reply generates in a thread of its own, under the engine's swap lock like any other
generation, and hands text to the request as the tokenizer decodes it. The pieces joined are the
reply the same request gets unstreamed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from transformers import PreTrainedTokenizerBase, TextIteratorStreamer

from adaptation.prompts import AnswerCut

# Generates with the given streamer attached; returns the version that answered.
Generation = Callable[[TextIteratorStreamer], int]


class Streamed:
    """Iterate it once for the text's pieces; afterwards `version` and `completion_tokens` say
    which adapter version wrote it and what it cost."""

    def __init__(
        self,
        generate: Generation,
        tokenizer: PreTrainedTokenizerBase,
        prompt_tokens: int,
        count: Callable[[str], int],
        cut_at_answer_end: bool,
    ) -> None:
        self._generate = generate
        self._tokenizer = tokenizer
        self._count = count
        self._cut = cut_at_answer_end
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.version = 0
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.version = self._generate(streamer)
            except BaseException as exc:  # handed to the request, which ends the stream
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name="uptake-stream", daemon=True)
        thread.start()
        cut = AnswerCut() if self._cut else None
        for piece in streamer:
            delta = cut.add(piece) if cut is not None else piece
            if delta:
                self.text += delta
                yield delta
        thread.join()
        if failure:
            raise failure[0]
        self.completion_tokens = self._count(self.text)
