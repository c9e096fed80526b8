"""API keys: who may read, write or administer which namespace, and how often.

A key is a random bearer token `uptake_<id>_<secret>`. Redis holds only its sha256 with its
namespace (or `*` for all), scopes, creation time and optional rate limit, so a copy of Redis
yields no usable token. Keys are checked on every request (revocation is immediate); while Redis
is down, a key Redis last confirmed stays valid, so answering keeps working.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import redis
from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.keys import Keys
from service.settings import NAMESPACE_PATTERN, Settings

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
ALL_NAMESPACES = "*"
TOKEN_PREFIX = "uptake"
WINDOW_SECONDS = 60

bearer = HTTPBearer(
    auto_error=False,
    description="an API key from `uptake keys create`, sent as `Authorization: Bearer <key>`",
)


def token_digest(token: str) -> str:
    """Tokens carry 256 random bits, so a fast hash is enough: nothing to brute-force."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    namespace: str
    scopes: tuple[Scope, ...]
    created: float
    rate_limit: int | None = None

    def covers(self, namespace: str) -> bool:
        return self.namespace in (ALL_NAMESPACES, namespace)

    def to_json(self, digest: str) -> str:
        return json.dumps(
            {
                "digest": digest,
                "namespace": self.namespace,
                "scopes": list(self.scopes),
                "created": self.created,
                "rate_limit": self.rate_limit,
            }
        )

    @classmethod
    def from_json(cls, key_id: str, raw: str) -> tuple[ApiKey, str]:
        """The key and the digest of its token."""
        data = json.loads(raw)
        key = cls(
            id=key_id,
            namespace=data["namespace"],
            scopes=tuple(data["scopes"]),
            created=data["created"],
            rate_limit=data["rate_limit"],
        )
        return key, data["digest"]


class KeyStore:
    """API keys in one Redis hash, id → record; the token itself is never stored."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def create(
        self, namespace: str, scopes: tuple[Scope, ...], rate_limit: int | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its token, which is shown once and cannot be recovered."""
        if namespace != ALL_NAMESPACES and not re.fullmatch(NAMESPACE_PATTERN, namespace):
            raise ValueError(
                f"namespace {namespace!r} is not valid: use letters, digits, '_' or '-' (1-64), "
                f"or {ALL_NAMESPACES!r} for every namespace"
            )
        unknown = sorted(set(scopes) - set(SCOPES))
        if not scopes or unknown:
            raise ValueError(f"give one or more scopes from {', '.join(SCOPES)}")
        if rate_limit is not None and rate_limit < 0:
            raise ValueError("a rate limit is a number of requests per minute, 0 or more")
        ordered = tuple(s for s in SCOPES if s in scopes)
        while True:
            key = ApiKey(secrets.token_hex(6), namespace, ordered, time.time(), rate_limit)
            token = f"{TOKEN_PREFIX}_{key.id}_{secrets.token_urlsafe(32)}"
            if self.redis.hsetnx(self.keys.api_keys, key.id, key.to_json(token_digest(token))):
                return key, token

    def authenticate(self, token: str) -> ApiKey | None:
        """The key a token belongs to, or None for a malformed, unknown or revoked token."""
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != TOKEN_PREFIX or not key_id or not secret:
            return None
        raw = self.redis.hget(self.keys.api_keys, key_id)
        if raw is None:
            return None
        key, digest = ApiKey.from_json(key_id, raw)
        return key if hmac.compare_digest(digest, token_digest(token)) else None

    def list_keys(self) -> list[ApiKey]:
        records = self.redis.hgetall(self.keys.api_keys)
        keys = [ApiKey.from_json(key_id, raw)[0] for key_id, raw in records.items()]
        return sorted(keys, key=lambda k: k.created)

    def revoke(self, key_id: str) -> bool:
        """True if the key existed; requests with its token fail from now on."""
        return bool(self.redis.hdel(self.keys.api_keys, key_id))


class RateLimiter:
    """A fixed one-minute window per key, counted in Redis so every API replica shares it."""

    def __init__(self, client: redis.Redis, keys: Keys, per_minute: int) -> None:
        self.redis = client
        self.keys = keys
        self.per_minute = per_minute

    def limit(self, key: ApiKey) -> int:
        return self.per_minute if key.rate_limit is None else key.rate_limit

    def hit(self, key: ApiKey) -> int | None:
        """Count one request; None if it is allowed, else the seconds until the window resets."""
        limit = self.limit(key)
        if limit == 0:
            return None
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        name = self.keys.rate_limit(key.id, window)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(name)
        pipe.expire(name, 2 * WINDOW_SECONDS)
        count, _ = pipe.execute()
        if count <= limit:
            return None
        return max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))


@dataclass(frozen=True)
class Access:
    """What one request may touch: its key's namespace, or everything when auth is off."""

    key: ApiKey | None = None

    def covers(self, namespace: str) -> bool:
        return self.key is None or self.key.covers(namespace)

    def visible(self, names: Iterable[str]) -> list[str]:
        """The namespaces among `names` this request may see, plus its key's own."""
        own = {self.key.namespace} if self.key and self.key.namespace != ALL_NAMESPACES else set()
        return sorted({ns for ns in names if self.covers(ns)} | own)

    def require(self, *namespaces: str) -> None:
        """403 unless the key covers every namespace the request names."""
        missing = sorted({ns for ns in namespaces if not self.covers(ns)})
        if missing and self.key is not None:
            wanted = ", ".join(repr(ns) for ns in missing)
            raise HTTPException(
                403,
                f"API key {self.key.id} is for namespace {self.key.namespace!r}, not {wanted}; "
                f"use a key created with `uptake keys create --namespace {missing[0]}` "
                f"(or --namespace '{ALL_NAMESPACES}')",
            )


class Authority:
    """Admits requests: finds the key behind the bearer token, counts it, checks its scopes."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys) -> None:
        self.enabled = settings.auth
        self.store = KeyStore(client, keys)
        self.limiter = RateLimiter(client, keys, settings.rate_limit_per_minute)
        self._confirmed: dict[str, ApiKey] = {}

    def admit(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None,
        scopes: tuple[Scope, ...],
    ) -> Access:
        """The request's access if its key holds one of `scopes`; else 401, 429 or 403."""
        if not self.enabled:
            return Access()
        if credentials is None:
            sent = "authorization" in request.headers
            raise _unauthorized(
                "the Authorization header must read `Bearer <key>`"
                if sent
                else "this endpoint needs an API key: send `Authorization: Bearer <key>`"
            )
        key = self._authenticate(credentials.credentials)
        if key is None:
            raise _unauthorized("this API key is unknown or was revoked", 'error="invalid_token"')
        self._count(key)
        if not set(scopes) & set(key.scopes):
            needed = " or ".join(scopes)
            raise HTTPException(
                403,
                f"API key {key.id} has scopes {', '.join(key.scopes)}; "
                f"{request.method} {request.url.path} needs {needed}. Use a key created with "
                f"`uptake keys create --namespace {key.namespace} --scope {scopes[0]}`",
            )
        return Access(key)

    def _authenticate(self, token: str) -> ApiKey | None:
        digest = token_digest(token)
        try:
            key = self.store.authenticate(token)
        except redis.RedisError:
            if digest in self._confirmed:  # Redis is down: trust what it last said
                return self._confirmed[digest]
            raise
        if key is None:
            self._confirmed.pop(digest, None)
        else:
            self._confirmed[digest] = key
        return key

    def _count(self, key: ApiKey) -> None:
        try:
            retry_after = self.limiter.hit(key)
        except redis.RedisError:  # no counter while Redis is down: let the request through
            return
        if retry_after is not None:
            raise HTTPException(
                429,
                f"API key {key.id} is over its limit of {self.limiter.limit(key)} requests per "
                f"minute; retry in {retry_after} s, or have an operator raise the limit "
                "(UPTAKE_RATE_LIMIT_PER_MINUTE, or `uptake keys create --rate-limit N`)",
                headers={"Retry-After": str(retry_after)},
            )


def _unauthorized(detail: str, challenge: str = "") -> HTTPException:
    hint = "; an operator creates keys with `uptake keys create --namespace NS --scope SCOPE`"
    header = f"Bearer {challenge}".strip()
    return HTTPException(401, detail + hint, headers={"WWW-Authenticate": header})
