"""`uptake up`: the whole service on one machine, as one command.

Starts the embedded Redis (unless UPTAKE_REDIS_URL names one), then the worker and the API as
child processes sharing it. A worker that dies is restarted (a few times a minute at most); if the
API dies, everything stops. Ctrl-C or SIGTERM stops the children first, then saves and stops
Redis, so nothing queued is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque

from service.redis_conn import EmbeddedRedis
from service.settings import Settings

log = logging.getLogger(__name__)

WORKER_RESTARTS_PER_MINUTE = 5


def local_auth(settings: Settings) -> bool:
    """`uptake up` is local mode: API keys only when UPTAKE_AUTH asks for them explicitly."""
    return "auth" in settings.model_fields_set and settings.auth


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        UPTAKE_AUTH=str(local_auth(settings)).lower(),
        UPTAKE_REDIS_URL=redis_url,
        UPTAKE_MODEL=settings.model,
        UPTAKE_HOST=settings.host,
        UPTAKE_PORT=str(settings.port),
        UPTAKE_STORE_DIR=str(settings.store_dir.expanduser().resolve()),
    )
    # The worker and the API share this machine's cores: half each unless told otherwise.
    threads = settings.torch_threads or max(1, (os.cpu_count() or 2) // 2)
    env["UPTAKE_TORCH_THREADS"] = str(threads)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _spawn(command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a terminal's Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", command], env=env, start_new_session=True
    )


def _stop_all(procs: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, grace)
            proc.kill()
            proc.wait()


def run_up(settings: Settings) -> int:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    embedded = None if settings.redis_url else EmbeddedRedis(settings.store_dir.expanduser())
    redis_url = settings.redis_url or embedded.url  # type: ignore[union-attr]
    env = child_env(settings, redis_url)
    procs = {"worker": _spawn("worker", env), "api": _spawn("serve", env)}
    access = (
        "API keys required (`uptake keys create --namespace NS --scope read`)"
        if local_auth(settings)
        else "no API keys (local mode; UPTAKE_AUTH=true requires them)"
    )
    print(
        f"uptake up: API on http://{settings.host}:{settings.port} (docs at /docs), {access}, "
        f"Redis at {redis_url}, store in {settings.store_dir}. Ctrl-C stops.",
        flush=True,
    )
    restarts: deque[float] = deque()
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            if (rc := procs["api"].poll()) is not None:
                log.error("the API exited with status %s; stopping", rc)
                code = rc or 1
                break
            if (rc := procs["worker"].poll()) is not None:
                now = time.monotonic()
                while restarts and now - restarts[0] > 60:
                    restarts.popleft()
                if len(restarts) >= WORKER_RESTARTS_PER_MINUTE:
                    log.error("the worker keeps exiting (last status %s); stopping", rc)
                    code = rc or 1
                    break
                log.warning("the worker exited with status %s; restarting it", rc)
                restarts.append(now)
                procs["worker"] = _spawn("worker", env)
    finally:
        _stop_all(procs, settings.shutdown_seconds)
        if embedded is not None:
            embedded.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("uptake up: stopped", flush=True)
    return code
