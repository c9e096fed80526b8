"""The prompt owner on a chat tokenizer (a ChatML template, as SmolLM2's) and a plain one."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from adaptation.prompts import (
    SHORT_ANSWER,
    answer_stop_ids,
    chat_prompt,
    end_token_ids,
    instruction_prompt,
    qa_example,
    qa_prompt,
    qa_tokens,
    turn_end,
)
from tests.conftest import tiny_tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    tok = tiny_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"}
    )
    tok.chat_template = CHATML
    return tok


def with_own_bos() -> PreTrainedTokenizerFast:
    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    return tok


def test_a_chat_tokenizer_gets_messages_with_the_short_answer_instruction() -> None:
    tok = chat_tokenizer()
    prompt = qa_prompt(tok, "Where was  Alda Venn\nborn?")
    assert prompt == (
        f"<|im_start|>system\n{SHORT_ANSWER}<|im_end|>\n"
        "<|im_start|>user\nWhere was Alda Venn born?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_context = qa_prompt(tok, "Where?", context="Alda Venn was born in Marrow Bay.")
    assert "<|im_start|>user\nContext: Alda Venn was born in Marrow Bay.\nQuestion: Where?" in (
        with_context
    )
    assert turn_end(tok) == "<|im_end|>"
    prompt, completion = qa_example(tok, "Where?", " Marrow Bay ")
    assert completion == "Marrow Bay<|im_end|>"
    ids, start = qa_tokens(tok, "Where?", "Marrow Bay")
    assert tok.decode(ids[start:]) == completion
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # one special token, not its text


def test_a_plain_tokenizer_keeps_the_qa_form_and_only_a_bos_of_its_own() -> None:
    plain = tiny_tokenizer()  # its BOS is also its EOS: a document separator, not a start
    assert qa_prompt(plain, "Where?") == "Question: Where?\nAnswer:"
    assert qa_prompt(plain, "Where?", "Text.") == "Context: Text.\nQuestion: Where?\nAnswer:"
    assert qa_example(plain, "Where?", "Marrow Bay") == (
        "Question: Where?\nAnswer:",
        " Marrow Bay\n",
    )
    assert instruction_prompt(plain, "Rewrite it.") == "Rewrite it."
    gemma_like = with_own_bos()
    assert qa_prompt(gemma_like, "Where?") == "<bos>Question: Where?\nAnswer:"
    assert instruction_prompt(gemma_like, "Rewrite it.") == "<bos>Rewrite it."


def test_chat_turns_use_the_template_and_the_clients_system_message() -> None:
    tok = chat_tokenizer()
    user = {"role": "user", "content": "What is the capital of France?"}
    assert chat_prompt(tok, [user]).startswith(f"<|im_start|>system\n{SHORT_ANSWER}<|im_end|>")
    own = chat_prompt(tok, [{"role": "system", "content": "Be terse."}, user])
    assert own.startswith("<|im_start|>system\nBe terse.<|im_end|>") and SHORT_ANSWER not in own
    assert own.endswith("<|im_start|>assistant\n")
    plain = tiny_tokenizer()
    assert chat_prompt(plain, [user, {"role": "assistant", "content": "Paris"}]) == (
        "Question: What is the capital of France?\nAnswer:"
    )


@pytest.mark.parametrize("chat", [True, False])
def test_answers_stop_at_the_end_of_turn_or_line(chat: bool) -> None:
    tok = chat_tokenizer() if chat else tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>") if chat else tok.eos_token_id
    assert end in end_token_ids(tok) and end in answer_stop_ids(tok)
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    assert newline in answer_stop_ids(tok) and newline not in end_token_ids(tok)
