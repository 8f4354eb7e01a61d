"""The replica's Prometheus metrics: one registry, prefix ``unbroken_replica_``.

Request-side series (requests, latencies, tokens) are recorded by the HTTP layer as requests
happen. Engine-side series (running/waiting sequences, KV bytes, preemptions, tokens/s) are read
from ``engine.stats()`` at scrape time by :class:`EngineCollector`, so the engine thread does no
metrics work.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "unbroken_replica_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
REQUEST_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Reads the engine's stats at scrape time. ``stats_fn`` returns an ``EngineStats`` or None
    (model still loading)."""

    def __init__(self, stats_fn: Callable[[], object | None]) -> None:
        self.stats_fn = stats_fn

    def collect(self) -> Iterable[Metric]:
        stats = self.stats_fn()
        if stats is None:
            return []
        gauges = [
            ("num_running", "Sequences in the running batch.", "num_running"),
            ("num_waiting", "Sequences waiting for admission.", "num_waiting"),
            ("kv_used_bytes", "KV cache bytes in use (running sequences and kept sessions).", "kv_bytes_used"),
            ("kv_free_bytes", "KV cache bytes left in the budget.", "kv_bytes_free"),
            ("device_memory_free_bytes", "Free device memory (host memory on the CPU).",
             "device_memory_free_bytes"),
            ("tokens_per_second", "Generated tokens per second over the last few seconds.", "tokens_per_s"),
        ]
        out: list[Metric] = []
        for name, doc, attr in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], float(getattr(stats, attr, 0) or 0))
            out.append(g)
        g = GaugeMetricFamily(PREFIX + "sessions_kept", "Sessions whose KV is kept between turns.")
        g.add_metric([], float(len(getattr(stats, "sessions", []) or [])))
        out.append(g)
        c = CounterMetricFamily(PREFIX + "preemptions", "Sequences preempted (KV freed, recomputed later).")
        c.add_metric([], float(getattr(stats, "num_preemptions", 0) or 0))
        out.append(c)
        # kvsync (zero when it is off).
        c = CounterMetricFamily(PREFIX + "kv_restores", "Session KV restores through kvsync, by outcome.",
                                labels=["outcome"])
        for outcome, n in sorted((getattr(stats, "restore_outcomes", None) or {}).items()):
            c.add_metric([outcome], float(n))
        out.append(c)
        for name, doc, attr in (
            ("restored_tokens", "Tokens of KV imported from kvsync instead of recomputed.", "num_restored_tokens"),
            ("kv_snapshots_published", "KV snapshots handed to the kvsync sidecar.", "num_snapshots_published"),
            ("kv_snapshots_dropped", "KV snapshots dropped because the kvsync queue was full.",
             "num_snapshots_dropped"),
        ):
            c = CounterMetricFamily(PREFIX + name, doc)
            c.add_metric([], float(getattr(stats, attr, 0) or 0))
            out.append(c)
        return out


class ReplicaMetrics:
    """Every series the replica exports, on its own registry."""

    def __init__(self, stats_fn: Callable[[], object | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds", "Time from request to the last byte, by route.",
            ["route"], buckets=REQUEST_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
            buckets=INTER_TOKEN_BUCKETS_S, registry=r)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens received.", registry=r)
        self.cached_prompt_tokens = Counter(
            PREFIX + "cached_prompt_tokens", "Prompt tokens whose KV was reused instead of recomputed.",
            registry=r)
        self.finished = Counter(PREFIX + "finished_requests", "Generations ended, by finish reason.",
                                ["reason"], registry=r)
        self.client_disconnects = Counter(
            PREFIX + "client_disconnects", "Generations aborted because the client went away.", registry=r)
        if stats_fn is not None:
            r.register(EngineCollector(stats_fn))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "EngineCollector", "PREFIX", "ReplicaMetrics"]
