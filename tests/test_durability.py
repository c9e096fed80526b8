"""Durability: the embedded Redis persists with AOF, and the worker's startup check quarantines
damaged snapshots and applies the documents only they held once more, exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.adapters import MANIFEST, AdapterStore
from service.api import create_app
from service.documents import DocumentStore
from service.keys import Keys
from service.metrics import ApiMetrics
from service.queue import Queue
from service.redis_conn import EmbeddedRedis, client
from service.settings import Settings
from service.worker import Worker
from tests.servicekit import drop_prefix, make_settings, redis_for_tests, unique_prefix, wait_until

NS = "durable"


def test_embedded_redis_runs_with_an_append_only_file(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "store")
    r = client(server.url)
    try:
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert Path(r.config_get("dir")["dir"]).resolve() == (tmp_path / "store").resolve()
        r.set("k", "v")
        aof = tmp_path / "store" / r.config_get("appendfilename")["appendfilename"]
        wait_until(lambda: aof.exists() and b"k" in aof.read_bytes(), 10, what="the AOF write")
    finally:
        r.close()
        server.close()


@pytest.fixture
def setup(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Settings, redis.Redis]]:
    with redis_for_tests(tmp_path) as url:
        prefix = unique_prefix()
        # Snapshots only by count, so the first run writes exactly versions 1, 2 and 3.
        settings = make_settings(
            tiny_model_dir, tmp_path / "store", url, prefix, snapshot_every=4, snapshot_seconds=600
        )
        r = client(url)
        yield settings, r
        r.close()
        drop_prefix(url, prefix)


def _drain(worker: Worker, done: object) -> None:
    def step() -> object:
        worker.run_once()
        return done() if callable(done) else done

    wait_until(step, 120, interval=0, what="the worker to finish")


def _damage(store: AdapterStore, how: str) -> None:
    if how == "truncated-middle":
        weights = store.path(NS, 2) / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (store.path(NS, 3) / MANIFEST).unlink()


@pytest.mark.parametrize(
    ("how", "intact", "quarantined"),
    [
        ("truncated-middle", 1, ["v000002-checksum", "v000003-orphan"]),
        ("manifest-deleted", 2, ["v000003-manifest"]),
    ],
)
def test_startup_check_quarantines_and_reapplies_exactly_once(
    setup: tuple[Settings, redis.Redis], how: str, intact: int, quarantined: list[str]
) -> None:
    settings, r = setup
    keys = Keys(settings.redis_prefix)
    docs = DocumentStore(r, keys)
    ids = [docs.submit(f"Ledger {i}: Oren Vask{i} sold {i} looms.", NS).id for i in range(12)]

    def applied() -> bool:
        return all(s and s.status == "applied" for s in docs.statuses(ids).values())

    first = Worker(settings)
    _drain(first, applied)
    first.shutdown()
    store = first.store
    assert store.versions(NS) == [1, 2, 3] and r.get(keys.version(NS)) == "3"

    _damage(store, how)
    leftover = store.root / NS / ".tmp-v000004-crashed"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    lost = {i for i, rec in docs.statuses(ids).items() if rec and rec.adapter_version > intact}

    announced = r.pubsub(ignore_subscribe_messages=True)
    announced.subscribe(keys.channel(NS))
    second = Worker(settings.model_copy(update={"worker_id": "after-crash"}))
    _drain(second, applied)
    second.shutdown()

    assert not leftover.exists()
    assert store.quarantined(NS) == quarantined
    first_message = wait_until(lambda: announced.get_message(timeout=1), 10, what="a publish")
    assert first_message["data"] == str(intact), "resumed from a damaged snapshot"
    announced.close()

    versions = store.versions(NS)
    assert versions[:intact] == list(range(1, intact + 1)) and versions[intact] == 4
    assert store.damaged(NS) == [] and all(store.verify(NS, v) for v in versions)
    assert r.get(keys.version(NS)) == str(versions[-1])
    chain, version = [], versions[-1]
    while version:
        manifest = store.manifest(NS, version)
        chain += manifest.doc_ids
        version = manifest.parent
    assert len(chain) == len(set(chain)) == len(ids) and set(chain) == set(ids)
    lineage = store.lineage(NS, versions[-1])
    records = docs.statuses(ids)
    assert all(records[i].adapter_version == lineage[i] for i in ids)
    assert {i for i in ids if lineage[i] > 3} == lost
    depth = Queue(r, keys).depth(NS)
    assert (depth.length, depth.pending, depth.dead) == (0, 0, 0)
    stats = r.hgetall(keys.stats(NS))
    assert stats["quarantined"] == str(len(quarantined)) and stats["requeued"] == str(len(lost))
    scrape = ApiMetrics(r, keys).render().decode()
    assert (
        f'uptake_snapshots_quarantined_total{{namespace="{NS}"}} {len(quarantined):.1f}' in scrape
    )


def test_requeue_takes_only_applied_documents_of_the_namespace_once(
    setup: tuple[Settings, redis.Redis],
) -> None:
    settings, r = setup
    keys = Keys(settings.redis_prefix)
    docs = DocumentStore(r, keys)
    applied = docs.submit("applied in version 5", NS).id
    queued = docs.submit("still queued", NS).id
    elsewhere = docs.submit("applied elsewhere", "other").id
    stream = keys.stream(NS)
    r.xtrim(stream, maxlen=0)
    docs.mark_applied([applied], 5)
    docs.mark_applied([elsewhere], 5)
    assert docs.applied_in(NS, [5]) == {applied} and docs.applied_in(NS, [4]) == set()
    assert docs.requeue(NS, [applied, queued, elsewhere, "missing"]) == [applied]
    assert docs.requeue(NS, [applied]) == []  # a repeated repair queues nothing twice
    record = docs.get(applied)
    assert record is not None
    assert (record.status, record.adapter_version, record.attempts) == ("queued", None, 0)
    assert [f["id"] for _, f in r.xrange(stream)] == [applied]


def test_repair_redoes_a_lost_forget_and_owns_up_to_a_lost_rollback(
    setup: tuple[Settings, redis.Redis],
) -> None:
    settings, r = setup
    keys = Keys(settings.redis_prefix)
    docs = DocumentStore(r, keys)
    for doc_id in "abcd":
        docs.submit(f"Document {doc_id}.", NS, doc_id=doc_id)
    r.xtrim(keys.stream(NS), maxlen=0)  # as if acknowledged; the group stays
    worker = Worker(settings)  # not loaded: the check needs no model
    store = worker.store

    def state(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(directory.name.encode())

    for version, doc_ids in ((1, ["a", "b"]), (2, ["c"]), (3, ["d"])):
        store.write(NS, version - 1, doc_ids, version + 1, state)
        docs.mark_applied(doc_ids, version)
    docs.forget(["b"])  # the forget and the rollback happened in versions since lost
    docs.mark(["c"], "rolled_back", "not in version 9")
    (store.path(NS, 3) / MANIFEST).unlink()

    worker.quarantine.repair(NS)
    assert store.versions(NS) == [1, 2] and store.quarantined(NS) == ["v000003-manifest"]
    assert [(op.operation, op.document) for op in worker.ns_store.pending(NS)] == [("forget", "b")]
    records = docs.statuses("abcd")
    assert {i: (rec.status, rec.adapter_version) for i, rec in records.items() if rec} == {
        "a": ("applied", 1),
        "b": ("forgotten", None),
        "c": ("applied", 2),
        "d": ("queued", None),
    }
    assert [f["id"] for _, f in r.xrange(keys.stream(NS))] == ["d"]
    with TestClient(create_app(settings)) as http:
        status = http.get("/v1/status", params={"namespace": NS}).json()
    assert status["quarantined"] == ["v000003-manifest"] and status["documents_applied"] == 3
    assert status["state_bytes"] == store.nbytes(NS, 2) > 0
