"""The adapter store: atomic, immutable, checksummed snapshots and their lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.adapters import MANIFEST, AdapterStore, Damage, publish_version, published_versions
from service.keys import Keys
from service.redis_conn import client
from tests.servicekit import drop_prefix, redis_for_tests, unique_prefix


def _state(payload: bytes):
    def write(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "optimizer.pt").write_bytes(payload[::-1])

    return write


def test_versions_chain_into_a_lineage(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    assert store.latest("ns") == 0 and store.manifests("ns") == []
    one = store.write("ns", 0, ["a", "b"], 2, _state(b"one"), info={"mode": "lora"})
    two = store.write("ns", one.version, ["c"], 3, _state(b"two"))
    assert (one.version, two.version, two.parent) == (1, 2, 1)
    assert store.latest("ns") == 2 and store.versions("ns") == [1, 2]
    assert [m.version for m in store.manifests("ns")] == [1, 2]
    assert store.manifest("ns", 1).info == {"mode": "lora"}
    assert store.lineage("ns", 2) == {"a": 1, "b": 1, "c": 2}
    assert store.lineage("ns", 1) == {"a": 1, "b": 1}
    assert store.verify("ns", 1) and store.verify("ns", 2)
    assert store.path("ns", 2).name == "v000002"
    assert store.namespaces() == ["ns"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "add"])
def test_checksum_detects_corruption(tmp_path: Path, damage: str) -> None:
    store = AdapterStore(tmp_path)
    store.write("ns", 0, ["a"], 1, _state(b"weights" * 100))
    target = store.path("ns", 1) / "adapter_model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[10] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "delete":
        (store.path("ns", 1) / "sub" / "optimizer.pt").unlink()
    else:
        (store.path("ns", 1) / "extra.bin").write_bytes(b"x")
    assert not store.verify("ns", 1)


def test_missing_snapshot_does_not_verify(tmp_path: Path) -> None:
    assert not AdapterStore(tmp_path).verify("ns", 3)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write("ns", 0, ["a"], 1, _state(b"one"))

    def explode(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write("ns", 1, ["b"], 2, explode)
    assert store.versions("ns") == [1]
    assert sorted(p.name for p in (tmp_path / "ns").iterdir()) == ["v000001"]


def test_a_crashed_writers_temp_dir_is_ignored_then_cleaned(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write("ns", 0, ["a"], 1, _state(b"one"))
    partial = tmp_path / "ns" / ".tmp-v000002-crashed"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"partial")
    assert store.latest("ns") == 1
    assert store.clean_partial("ns") == 1
    assert not partial.exists()
    assert store.write("ns", 1, ["b"], 2, _state(b"two")).version == 2


def _chain(store: AdapterStore, n: int) -> None:
    for v in range(1, n + 1):
        store.write("ns", v - 1, [f"d{v}"], v, _state(f"state {v}".encode() * 50))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", [Damage(3, "checksum", ("d3",))]),
        ("manifest-deleted", [Damage(3, "manifest")]),
        ("manifest-garbled", [Damage(3, "manifest")]),
        ("manifest-foreign", [Damage(3, "manifest", ("d3",))]),
        ("middle", [Damage(2, "checksum", ("d2",)), Damage(3, "orphan", ("d3",))]),
        ("parent-gone", [Damage(2, "orphan", ("d2",)), Damage(3, "orphan", ("d3",))]),
    ],
)
def test_damaged_snapshots_are_found_with_their_documents(
    tmp_path: Path, damage: str, expected: list[Damage]
) -> None:
    store = AdapterStore(tmp_path)
    _chain(store, 3)
    three = store.path("ns", 3)
    if damage == "truncate":
        weights = three / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:7])
    elif damage == "manifest-deleted":
        (three / MANIFEST).unlink()
    elif damage == "manifest-garbled":
        (three / MANIFEST).write_text('{"version": 3, "par', encoding="utf-8")
    elif damage == "manifest-foreign":
        text = (three / MANIFEST).read_text(encoding="utf-8")
        (three / MANIFEST).write_text(text.replace('"ns"', '"other"'), encoding="utf-8")
    elif damage == "middle":
        (store.path("ns", 2) / "sub" / "optimizer.pt").write_bytes(b"")
    else:
        for path in sorted(store.path("ns", 1).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        store.path("ns", 1).rmdir()
    assert store.damaged("ns") == expected


def test_quarantine_moves_snapshots_aside_and_never_reuses_their_numbers(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    _chain(store, 3)
    (store.path("ns", 3) / MANIFEST).unlink()
    assert store.damaged("ns") == [Damage(3, "manifest")]
    moved = store.quarantine("ns", store.damaged("ns"))
    assert moved == [tmp_path / "ns" / ".quarantine" / "v000003-manifest"]
    assert moved[0].is_dir() and (moved[0] / "adapter_model.safetensors").exists()
    assert store.quarantined("ns") == ["v000003-manifest"] and store.quarantined("other") == []
    assert store.versions("ns") == [1, 2] and store.damaged("ns") == []
    assert store.namespaces() == ["ns"]
    fresh = store.write("ns", 2, ["d3"], 3, _state(b"again"))
    assert (fresh.version, fresh.parent) == (4, 2)
    assert store.lineage("ns", 4) == {"d1": 1, "d2": 2, "d3": 4}
    assert store.quarantine("ns", []) == []


def test_snapshots_are_never_overwritten(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.write("ns", 0, ["a"], 1, _state(b"one"))
    before = (store.path("ns", 1) / "adapter_model.safetensors").read_bytes()
    store.write("ns", 1, ["b"], 2, _state(b"two"))
    assert (store.path("ns", 1) / "adapter_model.safetensors").read_bytes() == before


def test_publish_and_read_versions(tmp_path: Path) -> None:
    with redis_for_tests(tmp_path) as url:
        keys = Keys(unique_prefix())
        r = client(url)
        try:
            r.sadd(keys.namespaces, "a", "b")
            publish_version(r, keys, "a", 3)
            assert published_versions(r, keys) == {"a": 3, "b": 0}
        finally:
            r.close()
            drop_prefix(url, keys.prefix)
