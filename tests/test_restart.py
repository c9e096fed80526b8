"""`uptake up` with the embedded Redis: stop it and start it again; nothing queued or learned is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.servicekit import free_port, stop_process, wait_until

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _child(up: subprocess.Popen[bytes], command: str) -> psutil.Process:
    def find() -> psutil.Process | None:
        for child in psutil.Process(up.pid).children():
            if child.cmdline()[-1:] == [command]:
                return child
        return None

    return wait_until(find, 30, what=f"the {command} child")


def _sigterm_pending(proc: psutil.Process) -> bool:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & SIGTERM_BIT:
            return True
    return False


def test_queued_documents_and_versions_survive_a_restart(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPTAKE_")}
    env.update(
        UPTAKE_MODEL=str(tiny_model_dir),
        UPTAKE_STORE_DIR=str(tmp_path / "store"),
        UPTAKE_PORT=str(port),
        UPTAKE_DEVICE="cpu",
        UPTAKE_LORA_RANK="4",
        UPTAKE_SNAPSHOT_EVERY="2",
        UPTAKE_SNAPSHOT_SECONDS="0.5",
        UPTAKE_SHUTDOWN_SECONDS="60",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "up.log"
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def status(doc_id: str) -> dict:
        return http.get(f"/v1/documents/{doc_id}").json()

    def post(i: int) -> str:
        response = http.post(
            "/v1/documents", json={"text": f"Restart fact {i}: Ivo Tarn owns {i} boats."}
        )
        assert response.status_code == 202
        return response.json()["id"]

    up = _up(env, log)
    try:
        wait_until(lambda: _ready(http), 180, interval=0.5, what="the first `uptake up`")
        applied = [post(i) for i in range(4)]
        wait_until(
            lambda: all(status(i)["status"] == "applied" for i in applied), 120, what="applied"
        )
        before = http.get("/v1/adapters").json()["versions"]
        assert before and before[-1]["lineage_size"] == 4

        # Freeze the worker so new documents stay queued, then stop everything.
        worker = _child(up, "worker")
        worker.suspend()
        queued = [post(i) for i in range(4, 10)]
        assert all(status(i)["status"] == "queued" for i in queued)
        up.send_signal(signal.SIGTERM)
        wait_until(
            lambda: _sigterm_pending(worker), 30, interval=0.05, what="SIGTERM to reach the worker"
        )
        worker.resume()
        assert up.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert not worker.is_running()
        assert not _ready(http)

        up = _up(env, log)
        wait_until(lambda: _ready(http), 180, interval=0.5, what="the second `uptake up`")
        after = http.get("/v1/adapters").json()["versions"]
        assert after[: len(before)] == before
        for doc_id in applied:
            got = status(doc_id)
            assert got["status"] == "applied" and got["adapter_version"] <= before[-1]["version"]
        wait_until(
            lambda: all(status(i)["status"] == "applied" for i in queued),
            120,
            what="queued applied",
        )
        assert all(status(i)["adapter_version"] > before[-1]["version"] for i in queued)
        final = http.get("/v1/adapters").json()["versions"]
        assert final[-1]["lineage_size"] == 10
        chain = [d for v in final for d in v["doc_ids"]]
        assert sorted(chain) == sorted(applied + queued)
        assert http.get("/v1/status").json()["queue_length"] == 0
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        http.close()
        stop_process(up)
