"""Namespaces as the API configures them: their own settings and source trust weights in Redis,
and the admin operations (configure, rollback, forget) queued for the one worker that owns each
namespace.

The API validates and queues; the owning worker carries an operation out between documents, so
it never races that namespace's training, and an operation's entry is deleted only once its
result is durable and published, so a crash repeats it rather than losing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import get_args

import redis

from adaptation.data import all_questions, read_documents
from adaptation.paths import demo_weighter_dir
from adaptation.trust import SourceTrust
from service.adapters import AdapterStore
from service.documents import DocumentStore
from service.keys import Keys
from service.schemas import MAX_PROBES, NamespaceConfig, Operation, OperationName, Probe
from service.settings import Settings, Strategy


class Refused(Exception):
    """An operation the namespace's current state does not allow; `status` is its HTTP code."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class NamespaceStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def config(self, namespace: str) -> NamespaceConfig:
        raw = self.redis.get(self.keys.config(namespace))
        return NamespaceConfig.model_validate_json(raw) if raw else NamespaceConfig()

    def configure(self, namespace: str, config: NamespaceConfig) -> Operation:
        """Store the settings, make the namespace known to the workers, and tell its owner."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.config(namespace), config.model_dump_json())
        pipe.sadd(self.keys.namespaces, namespace)
        pipe.xadd(self.keys.operations(namespace), {"operation": "configure"})
        request = pipe.execute()[-1]
        return Operation(request=request, namespace=namespace, operation="configure")

    def trust(self, namespace: str, default: float) -> SourceTrust:
        """The namespace's source trust weights, with `default` (its default_trust) for the rest.
        A hash rather than one JSON value, so concurrent changes to two sources cannot clash;
        read live, so a new weight applies to the next document the worker learns."""
        weights = self.redis.hgetall(self.keys.sources(namespace))
        return SourceTrust({name: float(w) for name, w in weights.items()}, default)

    def set_trust(self, namespace: str, source: str, trust: float) -> None:
        self.redis.hset(self.keys.sources(namespace), source, repr(trust))

    def reset_trust(self, namespace: str, source: str) -> None:
        """Back to the namespace's default (a no-op for a source without a weight)."""
        self.redis.hdel(self.keys.sources(namespace), source)

    def request(
        self,
        namespace: str,
        operation: OperationName,
        version: int | None = None,
        document: str | None = None,
    ) -> Operation:
        fields = {"operation": operation}
        if version is not None:
            fields["version"] = str(version)
        if document is not None:
            fields["document"] = document
        request = self.redis.xadd(self.keys.operations(namespace), fields)
        return _operation(namespace, request, fields)

    def pending(self, namespace: str, count: int = 100) -> list[Operation]:
        entries = self.redis.xrange(self.keys.operations(namespace), count=count)
        return [_operation(namespace, request, fields) for request, fields in entries]

    def next(self, namespaces: Iterable[str]) -> dict[str, Operation]:
        """The oldest pending operation of each namespace that has one, in one round trip."""
        names = list(namespaces)
        pipe = self.redis.pipeline()
        for ns in names:
            pipe.xrange(self.keys.operations(ns), count=1)
        return {
            ns: _operation(ns, *entries[0])
            for ns, entries in zip(names, pipe.execute(), strict=True)
            if entries
        }

    def done(self, namespace: str, request: str) -> None:
        self.redis.xdel(self.keys.operations(namespace), request)


def _operation(namespace: str, request: str, fields: dict[str, str]) -> Operation:
    version = fields.get("version")
    return Operation(
        request=request,
        namespace=namespace,
        operation=fields["operation"],  # type: ignore[arg-type]
        version=int(version) if version is not None else None,
        document=fields.get("document"),
    )


def available_strategies(settings: Settings) -> tuple[Strategy, ...]:
    """Strategies a namespace may choose here: those needing no saved weighter, the service's
    own (its UPTAKE_WEIGHTER is for that one), and camels when the demo weighting model is
    installed and no other weighter is configured."""
    usable = {"uniform", "salient", settings.strategy}
    if settings.weighter is None and demo_weighter_dir().is_dir():
        usable.add("camels")
    return tuple(s for s in get_args(Strategy) if s in usable)


def default_probes(settings: Settings) -> tuple[Probe, ...]:
    """The service's probe questions (UPTAKE_GUARD_PROBES), for namespaces without their own."""
    return _read_probes(settings.guard_probes) if settings.guard_probes else ()


@lru_cache(maxsize=4)
def _read_probes(path: Path) -> tuple[Probe, ...]:
    qas = all_questions(read_documents(path))[:MAX_PROBES]
    return tuple(Probe(question=q.question, answers=list(q.answers)) for q in qas if q.answers)


def check_rollback(store: AdapterStore, docs: DocumentStore, namespace: str, version: int) -> None:
    """Raise `Refused` unless `version` can become current: it exists, is intact, is not already
    current, and holds no forgotten document (restoring it would bring that one back)."""
    current = store.latest(namespace)
    if version and version not in store.versions(namespace):
        raise Refused(
            404,
            f"namespace {namespace!r} has no version {version}; GET /v1/adapters?namespace="
            f"{namespace} lists its versions (0 is the bare base model)",
        )
    if version == current:
        raise Refused(409, f"version {version} is already current in namespace {namespace!r}")
    if version and not store.verify(namespace, version):
        raise Refused(
            409, f"version {version} fails its checksum, so it cannot be restored; choose another"
        )
    lineage = store.lineage(namespace, version)
    forgotten = [
        doc_id
        for doc_id, record in docs.statuses(lineage).items()
        if record is not None and record.status == "forgotten"
    ]
    if forgotten:
        raise Refused(
            409,
            f"version {version} holds forgotten documents ({', '.join(forgotten[:5])}); restoring "
            "it would bring them back. Roll back to a version made after the forget (its "
            "manifest's info lists `forgotten`) or to one older than them",
        )
