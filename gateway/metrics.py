"""The gateway's Prometheus metrics (prefix ``unbroken_gateway_``), one registry per app.

Per-replica health and breaker states, in-flight counts and queue depth are read at scrape time by
:class:`ReplicaCollector`, so the request path never updates a gauge for them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.breaker import BreakerState
from gateway.replicaset import Replica, ReplicaSet, ReplicaState

PREFIX = "unbroken_gateway_"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ReplicaCollector(Collector):
    def __init__(self, replicas: ReplicaSet, queue_depth: Callable[[], int], inflight: Callable[[], int],
                 resume_of: Callable[[Replica], dict[str, Any]] | None = None) -> None:
        self.replicas = replicas
        # A replica's resume modes as the relay applies them (vLLM and SGLang: token on the token route).
        self._resume_of = resume_of or (lambda rep: {"chat": rep.resume_chat, "completions": rep.resume_completions})
        self._queue_depth = queue_depth
        self._inflight = inflight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now_s = time.monotonic()
        health = GaugeMetricFamily(PREFIX + "replica_health_state",
                                   "1 for the replica's current health state, 0 for the others.",
                                   labels=["replica", "state"])
        breaker = GaugeMetricFamily(PREFIX + "replica_breaker_state",
                                    "1 for the replica's current circuit-breaker state, 0 for the others.",
                                    labels=["replica", "state"])
        inflight = GaugeMetricFamily(PREFIX + "replica_inflight_requests",
                                     "Requests this gateway process has in flight to the replica.",
                                     labels=["replica"])
        trips = GaugeMetricFamily(PREFIX + "replica_breaker_trips",
                                  "Times the replica's breaker opened since this gateway process started.",
                                  labels=["replica"])
        kind = GaugeMetricFamily(PREFIX + "replica_backend_info",
                                 "1 per replica: its kind and how its streams resume (token: exact; text: inexact "
                                 "continuation of the partial answer; none: fail over only before the first byte).",
                                 labels=["replica", "kind", "resume_chat", "resume_completions"])
        for rep in self.replicas:
            modes = self._resume_of(rep)
            kind.add_metric([rep.replica_id, rep.kind, modes["chat"], modes["completions"]], 1.0)
            for s in ReplicaState:
                health.add_metric([rep.replica_id, s.value], 1.0 if rep.state is s else 0.0)
            if rep.breaker is not None:
                for b in BreakerState:
                    breaker.add_metric([rep.replica_id, b.value], 1.0 if rep.breaker.state is b else 0.0)
                trips.add_metric([rep.replica_id], float(rep.breaker.num_trips))
            inflight.add_metric([rep.replica_id], float(rep.num_inflight))
        yield health
        yield breaker
        yield inflight
        yield trips
        stability = GaugeMetricFamily(PREFIX + "replica_stability_score",
                                      "The replica's decaying incident score (0 = stable); routing weighs by it.",
                                      labels=["replica"])
        for rep in self.replicas:
            stability.add_metric([rep.replica_id], rep.stability.score(now_s))
        yield stability
        standby = GaugeMetricFamily(PREFIX + "standby_replicas_ready", "Warm standbys ready to be promoted.")
        standby.add_metric([], float(self.replicas.num_standby_ready()))
        yield standby
        promotions = CounterMetricFamily(PREFIX + "standby_promotions",
                                         "Standbys put into rotation in place of a failed replica.")
        promotions.add_metric([], float(self.replicas.num_promotions))
        yield promotions
        yield kind
        q = GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting for capacity in the degradation queue.")
        q.add_metric([], float(self._queue_depth()))
        yield q
        f = GaugeMetricFamily(PREFIX + "inflight_requests", "Client requests in flight in this gateway process.")
        f.add_metric([], float(self._inflight()))
        yield f


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Client requests by route, status and serving replica.",
                                ["route", "status", "replica"], registry=r)
        self.request_duration = Histogram(PREFIX + "request_duration_seconds",
                                          "Time from request to the last byte, by route.", ["route"],
                                          buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from request to the first token sent to the client.", ["route"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.inter_token = Histogram(PREFIX + "inter_token_seconds",
                                     "Gap between consecutive stream chunks sent to the client.",
                                     buckets=ITL_BUCKETS_S, registry=r)
        self.upstream_attempts = Counter(PREFIX + "upstream_attempts", "Requests sent to replicas, by outcome.",
                                         ["replica", "outcome"], registry=r)
        self.retries = Counter(PREFIX + "retries", "Retries before the first byte, by reason.", ["reason"],
                               registry=r)
        self.retry_budget_exhausted = Counter(PREFIX + "retry_budget_exhausted",
                                              "Retries refused because the retry budget was spent.", registry=r)
        self.hedges = Counter(PREFIX + "hedges", "Hedged requests (critical priority), by outcome.", ["outcome"],
                              registry=r)
        self.failovers = Counter(PREFIX + "failovers", "Mid-stream resumptions on another replica, by reason.",
                                 ["reason"], registry=r)
        self.failover_failures = Counter(PREFIX + "failover_failures",
                                         "Streams that could not be resumed, by reason.", ["reason"], registry=r)
        self.degradations = Counter(PREFIX + "degradations", "Degradation tiers applied, by tier.", ["tier"],
                                    registry=r)
        self.sheds = Counter(PREFIX + "sheds", "Requests shed, by tier and priority.", ["tier", "priority"],
                             registry=r)
        self.resumes = Counter(PREFIX + "resumes", "Streams continued on another replica after their first byte, by "
                               "mode (token: exact; text: the partial answer as a prefix, inexact) and the kind of "
                               "replica that continued it.", ["mode", "kind"], registry=r)
        self.replica_rate_limited = Counter(PREFIX + "replica_rate_limited", "429 answers from replicas (each "
                                            "keeps that replica out of routing for its Retry-After).", ["replica"],
                                            registry=r)
        self.model_fallbacks = Counter(PREFIX + "model_fallbacks", "Requests sent to another model group, by why "
                                       "(context_length, error).", ["reason"], registry=r)
        self.session_moves = Counter(PREFIX + "session_moves", "Sessions moved to another replica.", registry=r)
        self.auth_failures = Counter(PREFIX + "auth_failures", "Requests refused by authentication.", ["reason"],
                                     registry=r)
        self.rate_limited = Counter(PREFIX + "rate_limited", "Requests refused by per-key limits.",
                                    ["key", "limit"], registry=r)
        self.client_disconnects = Counter(PREFIX + "client_disconnects",
                                          "Streams ended because the client left or was too slow.", ["reason"],
                                          registry=r)
        self.stream_state_writes = Counter(PREFIX + "stream_state_writes",
                                           "Stream states written behind the relay to Redis, by outcome "
                                           "(ok | error | dropped); not ok = resumable only on this gateway.",
                                           ["outcome"], registry=r)
        self.stream_state_reads = Counter(PREFIX + "stream_state_reads",
                                          "Stream states read back from Redis, by outcome (ok | error | malformed).",
                                          ["outcome"], registry=r)
        self.stream_resumes = Counter(PREFIX + "stream_resumes",
                                      "Client reconnects with Last-Event-ID, by outcome (local | redis: resumed "
                                      "from that state; refused: a 4xx).", ["outcome"], registry=r)
        self.idempotent_replays = Counter(PREFIX + "idempotent_replays",
                                          "Non-stream requests answered with the answer of an earlier one with "
                                          "the same X-Request-ID, by source (local | redis).", ["source"],
                                          registry=r)
        self.streams_running = Gauge(PREFIX + "streams_running",
                                     "Resumable streams this gateway process relays now (each kept in its stream "
                                     "state).", registry=r)

        self._request_children: dict[tuple[str, int, str], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}

    def count_request(self, route: str, status: int, replica: str, duration_s: float) -> None:
        """One finished client request (label children cached: this is on every request's path)."""
        key = (route, status, replica)
        c = self._request_children.get(key)
        if c is None:
            c = self._request_children[key] = self.requests.labels(route, str(status), replica)
        c.inc()
        h = self._duration_children.get(route)
        if h is None:
            h = self._duration_children[route] = self.request_duration.labels(route)
        h.observe(duration_s)

    def attach_replicas(self, collector: ReplicaCollector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
