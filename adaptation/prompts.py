"""The QA prompt format: one function, used by pretraining, evaluation and the service alike."""

from __future__ import annotations

ANSWER_END = "\n"


def qa_prompt(question: str, context: str | None = None) -> str:
    """The text the model continues with its answer. Context is only for retrieval modes."""
    q = " ".join(question.split())
    if context:
        return f"Context: {' '.join(context.split())}\nQuestion: {q}\nAnswer:"
    return f"Question: {q}\nAnswer:"


def qa_example(question: str, answer: str, context: str | None = None) -> tuple[str, str]:
    """A (prompt, completion) pair for training: the completion is what the loss is taken on."""
    return qa_prompt(question, context), f" {answer.strip()}{ANSWER_END}"


def clean_answer(generated: str) -> str:
    """Cut a generation at the end of its first line: the model's answer stops there."""
    return generated.split(ANSWER_END, 1)[0].strip()
