"""Prometheus metrics.

The worker's counters and its update-step histogram are kept in Redis (one hash per namespace),
and any API replica renders them at scrape time. So `/metrics` on the API shows the whole
system, whatever process or pod did the work. These values are global: scrape one replica, or
aggregate with max() rather than sum(). Answer latency and the serving version are per replica.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from service.adapters import published_versions
from service.keys import Keys

log = logging.getLogger(__name__)

INF = float("inf")
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, INF)
ANSWER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, INF)
_COUNTERS = {
    "received": "Documents accepted by the API",
    "applied": "Documents applied and published in an adapter snapshot",
    "failed": "Failed attempts to apply a document (it is retried, then dead-lettered)",
    "dead": "Documents dead-lettered after too many failed attempts",
    "held": "Documents held back by the update guard (their version lowered probe F1 too far)",
    "requeued": "Documents queued again because the only snapshot holding them was quarantined",
}


class WorkerStats:
    """The worker's side: counters incremented in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def count(self, namespace: str, name: str, amount: int = 1) -> None:
        self.redis.hincrby(self.keys.stats(namespace), name, amount)

    def step(self, namespace: str, seconds: float, tokens: int) -> None:
        bucket = bisect.bisect_left(STEP_BUCKETS, seconds)
        key = self.keys.stats(namespace)
        pipe = self.redis.pipeline()
        pipe.hincrby(key, f"step_bucket:{bucket}", 1)
        pipe.hincrbyfloat(key, "step_sum", seconds)
        pipe.hincrby(key, "tokens", tokens)
        pipe.execute()

    def problem(self, namespace: str, exc: OSError, seconds_valid: float) -> None:
        """Report that the namespace is stuck on `exc`. Only the error's kind is kept, never its
        file name: a path could tell a tenant about the store's layout."""
        reason = f"{exc.strerror} (errno {exc.errno})" if exc.strerror else type(exc).__name__
        key = self.keys.problem(namespace)
        pipe = self.redis.pipeline()
        pipe.hset(key, "reason", f"cannot write a snapshot: {reason}")
        pipe.hsetnx(key, "since", time.time())
        pipe.pexpire(key, int(seconds_valid * 1000))
        pipe.execute()

    def solved(self, namespace: str) -> None:
        self.redis.delete(self.keys.problem(namespace))


def worker_problem(client: redis.Redis, keys: Keys, namespace: str) -> tuple[str, float] | None:
    """(reason, since) while the worker reports the namespace stuck, else None."""
    found = client.hgetall(keys.problem(namespace))
    return (found["reason"], float(found["since"])) if found else None


class RedisStatsCollector(Collector):
    """Renders the Redis-held counters, queue depths and published versions at scrape time."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def collect(self) -> Iterator[object]:
        try:
            versions = published_versions(self.redis, self.keys)
            pipe = self.redis.pipeline()
            for ns in versions:
                pipe.hgetall(self.keys.stats(ns))
                pipe.xlen(self.keys.stream(ns))
                pipe.exists(self.keys.problem(ns))
            replies = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics: Redis unreachable (%s); serving process metrics only", exc)
            return
        stats = dict(zip(versions, replies[0::3], strict=True))
        lags = dict(zip(versions, replies[1::3], strict=True))
        problems = dict(zip(versions, replies[2::3], strict=True))
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(
                f"uptake_documents_{name}", help_text, labels=["namespace"]
            )
            for ns, h in stats.items():
                family.add_metric([ns], float(h.get(name, 0)))
            yield family
        tokens = CounterMetricFamily(
            "uptake_tokens_trained", "Tokens the worker has trained on", labels=["namespace"]
        )
        lag = GaugeMetricFamily(
            "uptake_queue_lag",
            "Documents queued or in flight, not yet acknowledged",
            labels=["namespace"],
        )
        published = GaugeMetricFamily(
            "uptake_published_adapter_version",
            "Newest published adapter version",
            labels=["namespace"],
        )
        quarantined = CounterMetricFamily(
            "uptake_snapshots_quarantined",
            "Damaged snapshots the worker's startup check moved into .quarantine",
            labels=["namespace"],
        )
        stuck = GaugeMetricFamily(
            "uptake_worker_problem",
            "1 while the worker reports it cannot make progress (GET /v1/status says why)",
            labels=["namespace"],
        )
        steps = HistogramMetricFamily(
            "uptake_update_step_seconds", "Time to apply one document", labels=["namespace"]
        )
        for ns, h in stats.items():
            tokens.add_metric([ns], float(h.get("tokens", 0)))
            quarantined.add_metric([ns], float(h.get("quarantined", 0)))
            lag.add_metric([ns], float(lags[ns]))
            published.add_metric([ns], float(versions[ns]))
            stuck.add_metric([ns], float(problems[ns]))
            cumulative, buckets = 0, []
            for i, bound in enumerate(STEP_BUCKETS):
                cumulative += int(h.get(f"step_bucket:{i}", 0))
                buckets.append(("+Inf" if bound == INF else str(bound), cumulative))
            steps.add_metric([ns], buckets, sum_value=float(h.get("step_sum", 0.0)))
        yield from (tokens, quarantined, lag, published, stuck, steps)


class ApiMetrics:
    """One registry per app, so several apps (or tests) in one process do not collide."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.registry = CollectorRegistry()
        self.answer_seconds = Histogram(
            "uptake_answer_seconds",
            "Time to answer a question (excluding wait_for)",
            ["namespace"],
            buckets=ANSWER_BUCKETS,
            registry=self.registry,
        )
        self.answer_batch_size = Histogram(
            "uptake_answer_batch_size",
            "Questions answered together in one generate call (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.serving_version = Gauge(
            "uptake_adapter_version",
            "Adapter version this API replica serves",
            ["namespace"],
            registry=self.registry,
        )
        self.registry.register(RedisStatsCollector(client, keys))

    def render(self) -> bytes:
        return generate_latest(self.registry)
