"""The one owner of prompts: how a question, a question with context, a self-edit request and a
chat turn become model input, decided from the base's tokenizer.

Instruct models (a tokenizer with a chat template) get chat messages, with a system instruction
asking for a short answer: SmolLM2-135M-Instruct given no system message, or one that asks for "a
short phrase", drifts into other languages or repeats itself. Base models keep the plain
`Question: …\nAnswer:` form, opened by the BOS token where the tokenizer has a start marker of its
own. An answer ends at the end-of-turn token or at the end of its first line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypedDict

import torch
from transformers import PreTrainedTokenizerBase

ANSWER_END = "\n"
# Label of the positions the loss skips (transformers' and cross_entropy's convention).
IGNORE = -100
SHORT_ANSWER = "You are a helpful assistant. Answer in one short sentence."
ASSISTANT = "You are a helpful assistant."
# Stands in for an answer when the chat template is rendered to find what closes a turn.
_PROBE = "\x00answer\x00"
_QA_PAIR = re.compile(r"Question:\s*(.+?)\s*\n\s*Answer:\s*(.+)")

SELF_EDIT_PROMPTS: dict[str, str] = {
    "implications": (
        "Read the passage below and list the implications that follow from it, directly or "
        "indirectly. Write each implication as a sentence that names who or what it is about, "
        "one per line.\n\nPassage:\n{title}\n{passage}\n\nImplications:\n"
    ),
    "long-implications": (
        "Read the passage below and write out everything it implies, as thoroughly as it allows. "
        "Give each implication its own short paragraph that restates the names, numbers and dates "
        "it depends on, and leave a blank line between paragraphs.\n\n"
        "Passage:\n{title}\n{passage}\n\nImplications:\n"
    ),
    "rewrite": (
        "Rewrite the passage below in several different ways. Keep every fact, name, number and "
        "date, and leave a blank line between rewrites.\n\n"
        "Passage:\n{title}\n{passage}\n\nRewrites:\n"
    ),
    "self-qa": (
        "Write questions about the passage below that can be answered from it, each followed by "
        "its answer, in the form\nQuestion: ...\nAnswer: ...\n"
        "Leave a blank line between pairs.\n\nPassage:\n{title}\n{passage}\n\n"
        "Questions and answers:\n"
    ),
}
DEFAULT_SELF_EDIT_PROMPT = "implications"
# Probe questions for best-of-k: the model asks about the document, never seeing its gold
# questions; {n} is filled in by `probe_template`, the rest as a self-edit prompt's.
PROBE_QUESTIONS = (
    "Write {n} different questions about the passage below. Each question asks for one fact "
    "the passage states (a name, a number, a date or a place) and names who or what it is "
    "about, so that it can be understood without the passage. Write one question per line, "
    "numbered, without answers.\n\nPassage:\n{title}\n{passage}\n\nQuestions:\n"
)


class Message(TypedDict):
    role: str
    content: str


def is_chat(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _start(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS a plain prompt opens with: only a start marker of its own (Gemma's `<bos>`); a BOS
    that is also the EOS (GPT-2's, the demo model's) separates documents and is left out."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    return bos if bos and bos != eos else ""


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    return str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    )


def _fold(text: str) -> str:
    return " ".join(text.split())


def _plain_qa(question: str, context: str | None) -> str:
    if context:
        return f"Context: {_fold(context)}\nQuestion: {_fold(question)}\nAnswer:"
    return f"Question: {_fold(question)}\nAnswer:"


def qa_prompt(tokenizer: PreTrainedTokenizerBase, question: str, context: str | None = None) -> str:
    """The text the model continues with its answer. Context is for retrieval and reading."""
    if not is_chat(tokenizer):
        return _start(tokenizer) + _plain_qa(question, context)
    ask = f"Context: {_fold(context)}\nQuestion: {_fold(question)}" if context else _fold(question)
    return _render(tokenizer, [system(SHORT_ANSWER), {"role": "user", "content": ask}])


def qa_text(question: str, answer: str) -> str:
    """A question and its answer as training text (self-QA lines), in the plain QA form."""
    return f"{_plain_qa(question, None)} {answer.strip()}"


def read_qa_text(text: str) -> tuple[str, str] | None:
    """The (question, answer) of a self-QA pair written in the plain QA form, if it is one."""
    m = _QA_PAIR.search(text)
    if m is None or not m.group(2).strip():
        return None
    return m.group(1).strip(), m.group(2).splitlines()[0].strip()


def system(content: str) -> Message:
    return {"role": "system", "content": content}


def turn_end(tokenizer: PreTrainedTokenizerBase) -> str:
    """What closes an assistant turn (`<|im_end|>` for ChatML), or the newline of the plain form."""
    if not is_chat(tokenizer):
        return ANSWER_END
    rendered = str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}],
            tokenize=False,
        )
    )
    closing = rendered.split(_PROBE, 1)[-1].strip()
    return closing or (tokenizer.eos_token or ANSWER_END)


def qa_example(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, context: str | None = None
) -> tuple[str, str]:
    """A (prompt, completion) pair for training: the completion is what the loss is taken on."""
    prompt = qa_prompt(tokenizer, question, context)
    if is_chat(tokenizer):
        return prompt, f"{answer.strip()}{turn_end(tokenizer)}"
    return prompt, f" {answer.strip()}{ANSWER_END}"


def qa_tokens(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, context: str | None = None
) -> tuple[list[int], int]:
    """A QA training example as (prompt + completion ids, prompt length): the loss is taken on
    the ids from the prompt length on."""
    prompt, completion = qa_example(tokenizer, question, answer, context)
    p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return p + c, len(p)


def last_question(messages: Sequence[Message]) -> str:
    """What a conversation asks, where only a question can be asked: its last user message (else
    its last message)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """A conversation for the next assistant turn. Without a system message of the client's, the
    short-answer one is used; a plain model is asked the last user message in the QA form."""
    if not is_chat(tokenizer):
        return qa_prompt(tokenizer, last_question(messages))
    if not any(m["role"] == "system" for m in messages):
        messages = [system(SHORT_ANSWER), *messages]
    return _render(tokenizer, messages)


def self_edit_prompt(prompt: str, title: str | None, passage: str) -> str:
    """The request itself: a named prompt (see SELF_EDIT_PROMPTS), or a custom template with
    {title}/{passage}. `instruction_prompt` turns it into model input."""
    template = SELF_EDIT_PROMPTS.get(prompt)
    if template is None:
        if "{passage}" not in prompt:
            names = ", ".join(SELF_EDIT_PROMPTS)
            raise ValueError(
                f"unknown self-edit prompt {prompt!r}: use one of {names}, "
                "or a template string containing {passage} (and optionally {title})"
            )
        template = prompt
    return template.format(title=(title or "").strip(), passage=passage.strip())


def self_edit_request(
    tokenizer: PreTrainedTokenizerBase, prompt: str, title: str | None, passage: str
) -> str:
    """A self-edit request as model input."""
    return instruction_prompt(tokenizer, self_edit_prompt(prompt, title, passage))


def probe_template(n: int) -> str:
    """The probe-question request for n questions, a template with {title}/{passage} as
    `self_edit_prompt` takes (so `self_edit_request` renders it and passages are fitted alike)."""
    if n < 1:
        raise ValueError(f"ask for at least one probe question, got {n}")
    return PROBE_QUESTIONS.replace("{n}", str(n))


def instruction_prompt(tokenizer: PreTrainedTokenizerBase, request: str) -> str:
    """A request for free text (a self-edit, probe questions): a user turn for an instruct model,
    the request itself for a base model to continue."""
    if not is_chat(tokenizer):
        return _start(tokenizer) + request
    return _render(tokenizer, [system(ASSISTANT), {"role": "user", "content": request}])


def end_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a generation: the EOS and, for an instruct model, the end of its turn."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if is_chat(tokenizer):
        closing = tokenizer(turn_end(tokenizer), add_special_tokens=False)["input_ids"]
        ids.update(closing[:1])
    return sorted(ids)


def answer_stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end an answer: the end tokens and the newline."""
    newline = tokenizer.encode(ANSWER_END, add_special_tokens=False)[-1:]
    return sorted({*newline, *end_token_ids(tokenizer)})


def answer_batch(
    seqs: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels, attention mask) for (ids, loss start) pairs; labels are
    `IGNORE` before each loss start and on padding."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, start : len(s)] = torch.tensor(s[start:])
        mask[i, : len(s)] = 1
    return ids, labels, mask


def clean_answer(generated: str) -> str:
    """Cut a generation at the end of its first line: the model's answer stops there."""
    return generated.split(ANSWER_END, 1)[0].strip()


class AnswerCut:
    """`clean_answer` applied while the text arrives: `add` returns the part of the answer that
    is now certain, so the parts joined equal `clean_answer` of the whole text. Whitespace at the
    end is held back until text follows it, and nothing after the first line is released."""

    def __init__(self) -> None:
        self._text = ""
        self._sent = 0

    @property
    def done(self) -> bool:
        return ANSWER_END in self._text

    def add(self, piece: str) -> str:
        if self.done:
            return ""
        self._text += piece
        visible = clean_answer(self._text)
        delta = visible[self._sent :]
        self._sent = len(visible)
        return delta
