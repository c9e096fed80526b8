"""`stream: true` on the OpenAI-compatible routes, through the real `openai` client against a
live API: the chunks joined are the unstreamed reply, and every reply reports its real usage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from adaptation.prompts import AnswerCut, clean_answer
from tests.servicekit import Served, serve

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where was Alda Venn born?"},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("streaming"), tiny_model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(served: Served) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused-in-local-mode", max_retries=0)


def test_a_streamed_chat_joins_to_the_unstreamed_reply(client: OpenAI, served: Served) -> None:
    whole = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=CHAT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert whole.choices[0].message.content, "the tiny model's reply is empty: nothing is compared"
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_a_streamed_completion_joins_to_the_unstreamed_one(client: OpenAI) -> None:
    whole = client.completions.create(model="default", prompt="Alda Venn", max_tokens=10)
    assert whole.choices[0].text and whole.usage.completion_tokens > 0
    stream = client.completions.create(
        model="default", prompt="Alda Venn", max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text


def test_a_stream_is_refused_like_any_request(served: Served) -> None:
    too_long = served.http.post("/v1/completions", json={"prompt": "word " * 700, "stream": True})
    assert too_long.status_code == 422 and "shorter prompt" in too_long.text
    events = served.http.post(
        "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "stream": True}
    )
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    "text", ["  Paris is big. \nMore", "Paris", "\nlater", " a  b ", "x \t\n y", ""]
)
def test_the_answer_cut_releases_what_clean_answer_keeps(text: str) -> None:
    for size in (1, 2, 5):
        cut = AnswerCut()
        joined = "".join(cut.add(text[i : i + size]) for i in range(0, len(text), size))
        assert joined == clean_answer(text)
