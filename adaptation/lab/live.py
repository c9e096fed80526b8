"""The service as deployed, driven from outside: `uptake serve` (and `uptake worker`) as child
processes configured only by `UPTAKE_*` environment variables, reached over HTTP.

The lab measures the service through this launcher instead of importing it, so what it measures
is what a user runs, and the lab stays free of `service/`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def live_service(env: Mapping[str, str], logs: Path, with_worker: bool) -> Iterator[httpx.Client]:
    """An HTTP client to a fresh `uptake serve` (and `uptake worker`) on a free port.

    `env` holds the `UPTAKE_*` variables both processes run under (the rest of this process's
    environment is inherited); each process's output goes to `logs/<command>.log`, so a client
    in this process never shares an interpreter with the server."""
    host = env.get("UPTAKE_HOST", "127.0.0.1")
    with socket.socket() as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    child = {k: v for k, v in os.environ.items() if not k.startswith("UPTAKE_")}
    child.update(env)
    child.update({"UPTAKE_HOST": host, "UPTAKE_PORT": str(port)})
    if with_worker and "UPTAKE_TORCH_THREADS" not in env:  # two model processes share the cores
        child["UPTAKE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for command in ["serve", "worker"] if with_worker else ["serve"]:
        with (logs / f"{command}.log").open("ab") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", command],
                    env=child,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    http = httpx.Client(base_url=f"http://{host}:{port}", timeout=600)

    def ready() -> bool:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a service process exited during start-up; see {logs}")
        return http.get("/readyz").status_code == 200

    try:
        wait_until(ready, 600, f"the API to be ready (logs in {logs})")
        yield http
    finally:
        http.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)


def wait_until(probe: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `probe` (an HTTP error counts as not yet) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
