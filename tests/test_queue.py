"""The queue and the document store against a real Redis (a key prefix per test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.documents import DocumentStore, IdConflict
from service.keys import Keys
from service.queue import Queue
from service.redis_conn import client
from tests.servicekit import drop_prefix, redis_for_tests, unique_prefix


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[redis.Redis, DocumentStore, Queue]]:
    with redis_for_tests(tmp_path) as url:
        keys = Keys(unique_prefix())
        r = client(url)
        yield r, DocumentStore(r, keys), Queue(r, keys)
        r.close()
        drop_prefix(url, keys.prefix)


def test_submit_stores_and_queues_once(stores: tuple[redis.Redis, DocumentStore, Queue]) -> None:
    r, docs, queue = stores
    first = docs.submit("Alda Venn was born in Marrow Bay.", "ns1", source="s", metadata={"k": 1})
    again = docs.submit("Alda Venn was born in Marrow Bay.", "ns1")
    assert first.created and not again.created
    assert first.id == again.id and again.status == "queued" and again.namespace == "ns1"
    assert queue.depth("ns1").length == 1
    record = docs.get(first.id)
    assert record is not None
    assert record.text == "Alda Venn was born in Marrow Bay."
    assert (record.source, record.metadata, record.status, record.attempts) == (
        "s",
        {"k": 1},
        "queued",
        0,
    )
    assert r.sismember(docs.keys.namespaces, "ns1")
    other_ns = docs.submit("Alda Venn was born in Marrow Bay.", "ns2")
    assert other_ns.id != first.id and other_ns.created


def test_client_id_conflict_is_refused(stores: tuple[redis.Redis, DocumentStore, Queue]) -> None:
    _, docs, queue = stores
    docs.submit("one text", "ns", doc_id="my-id")
    assert docs.submit("one text", "ns", doc_id="my-id").created is False
    with pytest.raises(IdConflict, match="my-id"):
        docs.submit("another text", "ns", doc_id="my-id")
    assert queue.depth("ns").length == 1


def test_read_then_ack_empties_the_stream(stores: tuple[redis.Redis, DocumentStore, Queue]) -> None:
    _, docs, queue = stores
    ids = [docs.submit(f"document number {i}", "ns").id for i in range(5)]
    entries = queue.read(["ns"], "c1", count=10, block_ms=None)
    assert [e.doc_id for e in entries] == ids
    assert queue.read(["ns"], "c1", count=10, block_ms=50) == []
    assert queue.depth("ns").pending == 5
    queue.ack("ns", [e.entry_id for e in entries[:3]])
    depth = queue.depth("ns")
    assert (depth.length, depth.pending, depth.dead) == (2, 2, 0)


def test_claim_pending_takes_over_a_dead_consumer(
    stores: tuple[redis.Redis, DocumentStore, Queue],
) -> None:
    _, docs, queue = stores
    for i in range(3):
        docs.submit(f"doc {i}", "ns")
    taken = queue.read(["ns"], "dead-worker", count=10, block_ms=None)
    assert queue.claim_pending("ns", "new-worker", min_idle_ms=60_000) == []
    claimed = queue.claim_pending("ns", "new-worker")
    assert [e.entry_id for e in claimed] == [e.entry_id for e in taken]
    assert queue.read(["ns"], "new-worker", count=10, block_ms=None) == []


def test_dead_letter_records_reason(stores: tuple[redis.Redis, DocumentStore, Queue]) -> None:
    _, docs, queue = stores
    doc = docs.submit("poison", "ns")
    (entry,) = queue.read(["ns"], "c", count=1, block_ms=None)
    assert docs.begin_attempt(doc.id) == 1
    docs.mark_failed(doc.id, "loss is nan", dead=True)
    queue.dead_letter(entry, "loss is nan")
    depth = queue.depth("ns")
    assert (depth.length, depth.pending, depth.dead) == (0, 0, 1)
    assert queue.dead_letters("ns")[0]["id"] == doc.id
    assert queue.dead_letters("ns")[0]["reason"] == "loss is nan"
    record = docs.get(doc.id)
    assert record is not None and (record.status, record.error, record.attempts) == (
        "dead",
        "loss is nan",
        1,
    )


def test_statuses_and_mark_applied(stores: tuple[redis.Redis, DocumentStore, Queue]) -> None:
    _, docs, _ = stores
    a = docs.submit("doc a", "ns").id
    b = docs.submit("doc b", "ns").id
    docs.mark_failed(a, "transient")
    docs.mark_applied([a, b], 7)
    got = docs.statuses([a, b, "missing"])
    assert got["missing"] is None
    assert {i: (r.status, r.adapter_version, r.error) for i, r in got.items() if r} == {
        a: ("applied", 7, None),
        b: ("applied", 7, None),
    }
