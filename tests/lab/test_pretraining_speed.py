"""How much faster the demo model's pretraining step is than one plain pass over the batch, on the
same batches of the same model in one run. A benchmark (slow):
`pytest -m slow tests/lab/test_pretraining_speed.py -s`."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adaptation.data import read_documents
from adaptation.lab import bootstrap
from adaptation.lab.world import write_world
from tests.conftest import one_padded_pass

BATCHES = 30
ROUNDS = 2
Batch = list[tuple[list[int], int]]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["demo", "reader"])
def test_pretraining_step_is_faster_than_one_pass_and_learns_the_same(
    tmp_path: Path, variant: str
) -> None:
    spec = bootstrap.SPECS[variant]
    write_world(tmp_path / "world", bootstrap._world_config(spec))
    pretrain = read_documents(tmp_path / "world" / "pretrain.jsonl")
    tok = bootstrap.pretrain_tokenizer(pretrain, spec)
    rng = random.Random(0)
    docs = bootstrap._encode_docs(pretrain, tok, spec.max_len)
    qa = bootstrap._encode_qa(pretrain, tok, rng, spec.context_share)
    lessons = bootstrap._reading_lessons(spec, tok)[0]
    batches = bootstrap._make_batches(docs, qa + lessons, spec, rng)[:BATCHES]
    torch.manual_seed(0)
    model = bootstrap.untrained_model(spec, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cpu = torch.device("cpu")
    steps: dict[str, Callable[[Batch], float]] = {
        "one pass": lambda b: one_padded_pass(model, b, tok.pad_token_id),
        "_train_step": lambda b: bootstrap._train_step(model, b, tok.pad_token_id, cpu),
    }
    seconds = dict.fromkeys(steps, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as `uptake bootstrap` runs
    for _ in range(ROUNDS):  # interleaved, so drift in the machine's speed hits both
        for name, step in steps.items():
            started = time.perf_counter()
            for batch in batches:
                step(batch)
                opt.step()
                opt.zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - started
    torch.set_num_threads(threads)
    model.zero_grad()
    same = [(steps["one pass"](b), steps["_train_step"](b)) for b in batches[:3]]
    ratio = seconds["one pass"] / seconds["_train_step"]
    print(
        f"\n{variant}: {BATCHES} batches x {ROUNDS} rounds, {os.cpu_count()} threads\n"
        "| step | seconds | steps / s |\n| --- | --- | --- |\n"
        + "".join(
            f"| {name} | {s:.1f} | {BATCHES * ROUNDS / s:.2f} |\n" for name, s in seconds.items()
        )
        + f"speed-up: {ratio:.2f}x"
    )
    assert all(a == pytest.approx(b, rel=1e-4) for a, b in same)
    assert ratio > 1.2
