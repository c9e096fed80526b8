"""The adapter store: immutable, versioned snapshots of each namespace's learned state.

Layout: `{root}/{namespace}/v{N:06d}/` holding the backend's files (PEFT adapter, optimizer state)
and `manifest.json`. A snapshot is written into a hidden temporary directory, fsynced and renamed
into place, so a reader sees either the whole snapshot or none of it. Version 0 is the bare base
model and has no directory. The newest version is also published in Redis for the serving engines.

A snapshot damaged after the fact (a disk fault, a file system that dropped writes) is found by
`damaged` and moved into `{root}/{namespace}/.quarantine/` by `quarantine`; version numbers are
never reused, so a number always names one set of weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from service.keys import Keys

MANIFEST = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_QUARANTINED_DIR = re.compile(r"^v(\d{6,})-")
_TMP_PREFIX = ".tmp-"
QUARANTINE = ".quarantine"


@dataclass(frozen=True)
class Manifest:
    version: int
    parent: int
    namespace: str
    doc_ids: tuple[str, ...]
    lineage_size: int
    created: float
    checksum: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["doc_ids"] = list(self.doc_ids)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Manifest:
        return cls(
            version=int(raw["version"]),
            parent=int(raw["parent"]),
            namespace=str(raw["namespace"]),
            doc_ids=tuple(raw["doc_ids"]),
            lineage_size=int(raw["lineage_size"]),
            created=float(raw["created"]),
            checksum=str(raw["checksum"]),
            info=dict(raw.get("info", {})),
        )


@dataclass(frozen=True)
class Damage:
    """A snapshot that cannot be trusted, why, and the documents its manifest names (if readable)."""

    version: int
    reason: Literal["manifest", "checksum", "orphan"]
    doc_ids: tuple[str, ...] = ()


def checksum(directory: Path) -> str:
    """sha256 over every file but the manifest: relative path and contents, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(path.relative_to(directory).as_posix().encode())
        h.update(b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, namespace: str, version: int) -> Path:
        return self.root / namespace / f"v{version:06d}"

    def namespaces(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def versions(self, namespace: str) -> list[int]:
        base = self.root / namespace
        if not base.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in base.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self, namespace: str) -> int:
        versions = self.versions(namespace)
        return versions[-1] if versions else 0

    def manifest(self, namespace: str, version: int) -> Manifest:
        with (self.path(namespace, version) / MANIFEST).open(encoding="utf-8") as fh:
            return Manifest.from_json(json.load(fh))

    def manifests(self, namespace: str) -> list[Manifest]:
        return [self.manifest(namespace, v) for v in self.versions(namespace)]

    def verify(self, namespace: str, version: int) -> bool:
        directory = self.path(namespace, version)
        try:
            return checksum(directory) == self.manifest(namespace, version).checksum
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def damaged(self, namespace: str) -> list[Damage]:
        """Every snapshot that cannot be resumed from, oldest first: an unreadable or foreign
        manifest, files that do not match its checksum, or a parent that is itself damaged or
        gone (its lineage could not be rebuilt)."""
        intact, out = {0}, []
        for version in self.versions(namespace):
            try:
                manifest = self.manifest(namespace, version)
            except (OSError, ValueError, KeyError, TypeError):
                out.append(Damage(version, "manifest"))
                continue
            if manifest.version != version or manifest.namespace != namespace:
                out.append(Damage(version, "manifest", manifest.doc_ids))
            elif not self.verify(namespace, version):
                out.append(Damage(version, "checksum", manifest.doc_ids))
            elif manifest.parent not in intact:
                out.append(Damage(version, "orphan", manifest.doc_ids))
            else:
                intact.add(version)
        return out

    def quarantine(self, namespace: str, damaged: Iterable[Damage]) -> list[Path]:
        """Move damaged snapshots into `.quarantine/vNNNNNN-<reason>`, kept for inspection."""
        base = self.root / namespace
        target = base / QUARANTINE
        moved = []
        for damage in damaged:
            if not target.is_dir():
                target.mkdir()
                _fsync(base)
            dest = target / f"v{damage.version:06d}-{damage.reason}"
            os.rename(self.path(namespace, damage.version), dest)
            moved.append(dest)
        if moved:
            _fsync(target)
            _fsync(base)
        return moved

    def nbytes(self, namespace: str, version: int) -> int:
        """What a snapshot costs on disk (0 for the bare base): the adapter and optimizer state,
        or the memory bank."""
        if version == 0:
            return 0
        return sum(
            p.stat().st_size for p in self.path(namespace, version).rglob("*") if p.is_file()
        )

    def quarantined(self, namespace: str) -> list[str]:
        """Names of the snapshots moved into quarantine, oldest version first."""
        target = self.root / namespace / QUARANTINE
        if not target.is_dir():
            return []
        return sorted(p.name for p in target.iterdir() if _QUARANTINED_DIR.match(p.name))

    def _next_version(self, namespace: str) -> int:
        """One past every version ever written, quarantined ones included: a serving engine or a
        document record that knew the old number must never meet different weights under it."""
        found = (_QUARANTINED_DIR.match(name) for name in self.quarantined(namespace))
        return max([self.latest(namespace), *(int(m.group(1)) for m in found if m)]) + 1

    def lineage(self, namespace: str, version: int) -> dict[str, int]:
        """Every document id in the chain ending at `version`, mapped to the version that added it."""
        out: dict[str, int] = {}
        while version > 0:
            manifest = self.manifest(namespace, version)
            out.update(dict.fromkeys(manifest.doc_ids, version))
            version = manifest.parent
        return out

    def write(
        self,
        namespace: str,
        parent: int,
        doc_ids: Iterable[str],
        lineage_size: int,
        write_state: Callable[[Path], None],
        info: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write snapshot `latest + 1` atomically; `write_state(dir)` fills in the backend's files."""
        base = self.root / namespace
        if not base.is_dir():
            base.mkdir(parents=True)
            _fsync(base.parent)  # the new namespace directory's entry must survive a crash too
        version = self._next_version(namespace)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}v{version:06d}-", dir=base))
        try:
            write_state(tmp)
            manifest = Manifest(
                version=version,
                parent=parent,
                namespace=namespace,
                doc_ids=tuple(doc_ids),
                lineage_size=lineage_size,
                created=time.time(),
                checksum=checksum(tmp),
                info=info or {},
            )
            (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1), encoding="utf-8")
            os.chmod(tmp, 0o755)
            _fsync_tree(tmp)
            os.rename(tmp, self.path(namespace, version))
            _fsync(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def clean_partial(self, namespace: str) -> int:
        """Remove temporary directories left by a writer that died mid-snapshot."""
        base = self.root / namespace
        if not base.is_dir():
            return 0
        partial = [p for p in base.iterdir() if p.name.startswith(_TMP_PREFIX)]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        if partial:
            _fsync(base)
        return len(partial)


def publish_version(client: redis.Redis, keys: Keys, namespace: str, version: int) -> None:
    pipe = client.pipeline()
    pipe.set(keys.version(namespace), version)
    pipe.publish(keys.channel(namespace), version)
    pipe.execute()


def published_versions(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The published version of every namespace known to Redis (0 where none is published yet)."""
    namespaces = sorted(client.smembers(keys.namespaces))
    if not namespaces:
        return {}
    values = client.mget([keys.version(ns) for ns in namespaces])
    return {ns: int(v or 0) for ns, v in zip(namespaces, values, strict=True)}
