"""Crash safety: SIGKILL the worker twice mid-stream; every document ends up applied exactly once."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from service.adapters import AdapterStore
from service.documents import DocumentStore
from service.keys import Keys
from service.queue import Queue
from service.redis_conn import client
from tests.servicekit import (
    drop_prefix,
    make_settings,
    redis_for_tests,
    start_worker,
    stop_process,
    unique_prefix,
    wait_until,
)

NS = "crash"


def test_sigkilled_worker_loses_nothing_and_repeats_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        settings = make_settings(
            tiny_model_dir, tmp_path / "store", url, prefix, snapshot_every=3, lease_seconds=3.0
        )
        r = client(url)
        keys = Keys(prefix)
        docs = DocumentStore(r, keys)
        store = AdapterStore(settings.adapters_dir())
        log = tmp_path / "worker.log"
        procs: list[subprocess.Popen[bytes]] = []

        def published() -> int:
            return int(r.get(keys.version(NS)) or 0)

        def submit(start: int, stop: int) -> list[str]:
            return [
                docs.submit(f"Record {i}: Ulla Brisk{i} joined Hale Works in {1900 + i}.", NS).id
                for i in range(start, stop)
            ]

        def run_until_killed(at_least: int) -> None:
            procs.append(start_worker(settings, log))
            try:
                wait_until(
                    lambda: published() >= at_least, 120, interval=0.02, what=f"version {at_least}"
                )
            except AssertionError:
                raise AssertionError(log.read_text()[-3000:]) from None
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait()

        try:
            ids = submit(0, 40)
            run_until_killed(2)
            statuses = docs.statuses(ids).values()
            assert any(s.status == "queued" for s in statuses), "the first kill came too late"
            ids += submit(40, 70)
            run_until_killed(published() + 3)
            ids += submit(70, 100)
            procs.append(start_worker(settings, log))

            def all_applied() -> bool:
                return all(s and s.status == "applied" for s in docs.statuses(ids).values())

            wait_until(all_applied, 180, interval=0.2, what="all 100 documents applied")
            assert stop_process(procs[-1]) == 0
        finally:
            for proc in procs:
                stop_process(proc)

        try:
            versions = store.versions(NS)
            assert versions == list(range(1, len(versions) + 1))
            assert all(store.verify(NS, v) for v in versions), "a snapshot fails its checksum"
            chain: list[str] = []
            version = versions[-1]
            while version:
                manifest = store.manifest(NS, version)
                assert manifest.parent == version - 1
                chain += manifest.doc_ids
                version = manifest.parent
            assert len(chain) == len(set(chain)) == 100, "a document was applied twice or never"
            assert set(chain) == set(ids)
            lineage = store.lineage(NS, versions[-1])
            for doc_id, record in docs.statuses(ids).items():
                assert record is not None and record.adapter_version == lineage[doc_id]
            depth = Queue(r, keys).depth(NS)
            assert (depth.length, depth.pending, depth.dead) == (0, 0, 0)
            assert published() == versions[-1]
        finally:
            r.close()
            drop_prefix(url, prefix)
