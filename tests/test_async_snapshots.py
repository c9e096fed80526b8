"""Snapshots written in the background (UPTAKE_ASYNC_SNAPSHOTS): learning goes on while one is
written, the snapshot holds the state of the moment it was taken, and versions are published in
order once on disk. A failing background write keeps its documents: tests/test_worker.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptation.data import Document
from adaptation.learner import IngestResult
from adaptation.modeling import adapter_state
from service.backends.lora import LoraBackend
from tests.servicekit import open_stack

TEXTS = [
    "Alda Venn works for Quillon Works in the harbour town of Marrow.",
    "Brisk Otterby was born in 1931 and later taught at Pellham College.",
]


def test_learning_goes_on_while_a_snapshot_is_written(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    events: list[str] = []
    captured: list[dict[str, torch.Tensor]] = []
    capture = LoraBackend.capture_state

    def slow_capture(self: LoraBackend) -> Callable[[Path], None]:
        captured.append(adapter_state(self.model, self.name))
        write = capture(self)

        def blocked(directory: Path) -> None:
            release.wait(30)
            write(directory)
            events.append("written")

        return blocked

    ingest = LoraBackend.ingest

    def recorded(self: LoraBackend, doc: Document, trust: float = 1.0) -> IngestResult:
        result = ingest(self, doc, trust)
        events.append("learned")
        return result

    monkeypatch.setattr(LoraBackend, "capture_state", slow_capture)
    monkeypatch.setattr(LoraBackend, "ingest", recorded)
    with open_stack(tmp_path, tiny_model_dir, snapshot_every=1, async_snapshots=True) as stack:
        [first] = stack.submit("ns", TEXTS[:1])
        stack.drain(lambda: events == ["learned"])  # its snapshot is being written, blocked
        [second] = stack.submit("ns", TEXTS[1:])
        threading.Timer(1.0, release.set).start()
        stack.drain(lambda: stack.applied([first, second]))
        assert events[:2] == ["learned", "learned"]  # the second was learned before v1 was on disk
        assert stack.status(first)["adapter_version"] == 1
        assert stack.status(second)["adapter_version"] == 2
        saved = load_file(str(stack.worker.store.path("ns", 1) / "adapter_model.safetensors"))
        assert saved.keys() == captured[0].keys()
        for key, value in captured[0].items():  # v1 holds the first document alone
            assert torch.equal(saved[key], value), key
        assert any(not torch.equal(v, captured[1][k]) for k, v in captured[0].items())


def test_snapshots_written_in_the_loop_still_publish(tmp_path: Path, tiny_model_dir: Path) -> None:
    with open_stack(tmp_path, tiny_model_dir, snapshot_every=1, async_snapshots=False) as stack:
        ids = stack.submit("ns", TEXTS)
        stack.drain(lambda: stack.applied(ids))
        assert stack.worker.namespaces["ns"].writing is None
        assert {stack.status(i)["adapter_version"] for i in ids} <= {1, 2}
        started = time.monotonic()
        stack.worker.shutdown()
        assert time.monotonic() - started < 30


@pytest.mark.parametrize("background", [True, False])
def test_the_guard_s_probe_f1_is_recorded_either_way(
    background: bool, tmp_path: Path, tiny_model_dir: Path
) -> None:
    probes = [{"question": "Where does Alda Venn work?", "answers": ["Quillon Works"]}]
    with open_stack(tmp_path, tiny_model_dir, async_snapshots=background) as stack:
        stack.configure("guarded", probes=probes, guard_epsilon=1.0)
        ids = stack.submit("guarded", TEXTS)
        stack.drain(lambda: stack.applied(ids))
        info = stack.worker.store.manifest("guarded", 1).info
        assert isinstance(info["probe_f1"], float)
