"""Namespace leases: one worker at a time trains a namespace, by holding its key in Redis.

A lease is the key `{prefix}:{ns}:lease` set to the worker's id with an expiry; its holder
renews it well before it lapses, and only the holder may renew or release it (a Lua script
compares and acts in one step, so a lapsed holder cannot touch another worker's lease).
"""

from __future__ import annotations

import redis

from service.keys import Keys

# Renew (or re-take) a lease only while we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """The leases one worker (`owner`) takes, renews and releases, each lasting `seconds`."""

    def __init__(self, client: redis.Redis, keys: Keys, owner: str, seconds: float) -> None:
        self.redis = client
        self.keys = keys
        self.owner = owner
        self.seconds = seconds
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def ms(self) -> int:
        return int(self.seconds * 1000)

    def take(self, namespace: str) -> bool:
        """Take the lease if it is free, or renew it if it is already ours."""
        return self.take_if_free(namespace) or self.renew(namespace)

    def take_if_free(self, namespace: str) -> bool:
        """Take the lease only if no worker holds it."""
        return bool(self.redis.set(self.keys.lease(namespace), self.owner, nx=True, px=self.ms))

    def renew(self, namespace: str) -> bool:
        """Extend the lease; False if it is no longer ours."""
        return bool(self._renew(keys=[self.keys.lease(namespace)], args=[self.owner, self.ms]))

    def release(self, namespace: str) -> None:
        """Hand the lease back, if it is still ours."""
        self._release(keys=[self.keys.lease(namespace)], args=[self.owner])
