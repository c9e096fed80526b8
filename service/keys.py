"""Every Redis key the service uses, in one place, under one prefix (so deployments can share a Redis)."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    prefix: str = "uptake"

    @property
    def namespaces(self) -> str:
        """Set of every namespace that has received a document or been configured."""
        return f"{self.prefix}:namespaces"

    def doc(self, doc_id: str) -> str:
        """Hash: a document's text, namespace and status."""
        return f"{self.prefix}:doc:{doc_id}"

    def stream(self, namespace: str) -> str:
        """Stream of document ids not yet acknowledged (acked entries are deleted)."""
        return f"{self.prefix}:{namespace}:stream"

    def dead(self, namespace: str) -> str:
        """Stream of dead-lettered document ids with their reasons."""
        return f"{self.prefix}:{namespace}:dead"

    def version(self, namespace: str) -> str:
        """The newest published adapter version (an int; 0 is the bare base model)."""
        return f"{self.prefix}:{namespace}:version"

    def channel(self, namespace: str) -> str:
        """Pub/sub channel announcing each newly published version."""
        return f"{self.prefix}:{namespace}:versions"

    def lease(self, namespace: str) -> str:
        """The id of the one worker allowed to train this namespace."""
        return f"{self.prefix}:{namespace}:lease"

    def config(self, namespace: str) -> str:
        """JSON of the namespace's own settings (PUT /v1/namespaces/{ns}); absent: the defaults."""
        return f"{self.prefix}:{namespace}:config"

    def sources(self, namespace: str) -> str:
        """Hash of source name → trust weight in [0, 1]; unlisted sources get `default_trust`."""
        return f"{self.prefix}:{namespace}:sources"

    def operations(self, namespace: str) -> str:
        """Stream of admin operations (configure, rollback, forget) for the namespace's worker."""
        return f"{self.prefix}:{namespace}:operations"

    def stats(self, namespace: str) -> str:
        """Hash of counters the worker keeps, so any API replica can serve them as metrics."""
        return f"{self.prefix}:{namespace}:stats"

    def problem(self, namespace: str) -> str:
        """Hash {reason, since} while the worker cannot make progress on the namespace (a snapshot
        it cannot write); it expires unless renewed, so a gone worker's report fades."""
        return f"{self.prefix}:{namespace}:problem"

    @property
    def api_keys(self) -> str:
        """Hash of API keys, id → JSON record holding the token's sha256 (never the token)."""
        return f"{self.prefix}:api-keys"

    def rate_limit(self, key_id: str, window: int) -> str:
        """Requests made with one API key in one rate-limit window (expires after it)."""
        return f"{self.prefix}:ratelimit:{key_id}:{window}"
