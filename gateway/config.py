"""The gateway's typed configuration (``configs/gateway.yaml``, env ``UNBROKEN_GATEWAY__SECTION__FIELD``).

One section per concern; every field has a default, a description and its unit in its name.
:func:`load_gateway_config` is called once, at the entry point.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from pydantic import Field, field_validator, model_validator

from unbroken.config import Section, load_config

# The policies gateway/policies registers (a test holds the two equal); named here so that the
# config does not import the policies, which import the config.
POLICY_NAMES = ("least_load", "power_of_two", "round_robin")

ENV_PREFIX = "UNBROKEN_GATEWAY"


class ServerSection(Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing the port (SO_REUSEPORT); "
                                                     "their shared state lives in Redis when redis.url is set.")
    max_body_bytes: int = Field(1024 * 1024, gt=0, description="Largest accepted request body, in bytes.")
    client_write_timeout_s: float = Field(
        30.0, gt=0, description="A client that does not take a stream chunk within this time is dropped "
                                "(its replica request is cancelled); others are never held up.")
    request_deadline_s: float = Field(300.0, gt=0, description="Default end-to-end deadline per request.")
    shutdown_timeout_s: float = Field(10.0, ge=0, description="On SIGTERM, how long running streams may finish.")


class ReplicasSection(Section):
    urls: list[str] = Field(default_factory=list, description="Static replica base URLs (http://host:port).")
    shared_token: str = Field("", description="Bearer token sent to replicas (they check it); empty = none.")
    connect_timeout_s: float = Field(1.0, gt=0, description="TCP connect timeout to a replica.")
    first_byte_timeout_s: float = Field(60.0, gt=0, description="Longest wait for a replica's response "
                                                                "headers (prefill of a long prompt).")
    stall_timeout_s: float = Field(5.0, gt=0, description="A stream with no chunk for this long is stalled: "
                                                          "the gateway fails it over.")
    nonstream_timeout_s: float = Field(120.0, gt=0, description="Longest a non-stream replica call may take.")
    no_replica_wait_s: float = Field(5.0, ge=0, description="When no replica can take a request (or a stream "
                                     "to resume) right now, keep trying this long (within the deadline) "
                                     "before giving up: a replica coming back or a half-open breaker "
                                     "letting work through again is often a moment away.")
    max_connections_per_replica: int = Field(256, gt=0, description="Pooled connections per replica.")


class RedisSection(Section):
    url: str = Field("", description="Redis for discovery, session placement and shared limits (empty = off).")
    discovery_interval_ms: int = Field(500, gt=0, description="How often to SCAN the replica registry.")
    key_prefix: str = Field("unbroken:", description="Prefix of every key the gateway reads or writes.")
    session_ttl_s: int = Field(3600, gt=0, description="Lifetime of a recorded session placement override.")
    op_timeout_s: float = Field(0.5, gt=0, description="Timeout for one Redis operation; Redis being slow "
                                                       "or gone never fails a request.")


class HealthSection(Section):
    heartbeat_interval_ms: int = Field(100, gt=0, description="How often each replica's /state is polled.")
    heartbeat_timeout_ms: int = Field(250, gt=0, description="Timeout of one heartbeat poll.")
    suspect_after_misses: int = Field(1, ge=1, description="Missed heartbeats (timeouts) before SUSPECT "
                                                           "(out of rotation).")
    unhealthy_after_misses: int = Field(3, ge=1, description="Missed heartbeats before UNHEALTHY.")
    healthy_after_successes: int = Field(1, ge=1, description="Good heartbeats to return to HEALTHY.")


class BreakerSection(Section):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    failure_rate_threshold: float = Field(0.5, gt=0, le=1, description="Failure share in the window that "
                                                                        "opens it (with min requests).")
    window_requests: int = Field(20, ge=1, description="Outcomes kept for the failure rate.")
    min_requests: int = Field(10, ge=1, description="Outcomes needed before the rate is judged.")
    open_duration_s: float = Field(2.0, gt=0, description="How long the breaker stays open before probes.")
    half_open_max_probes: int = Field(1, ge=1, description="Probe requests let through while half-open.")
    half_open_successes: int = Field(2, ge=1, description="Probe successes that close it again.")


class RoutingSection(Section):
    policy: str = Field("least_load", description="Default policy: least_load | power_of_two | round_robin.")
    session_affinity: bool = Field(True, description="Route X-Session-ID / user to its replica on a "
                                                     "consistent-hash ring with bounded load.")
    adapter_affinity: bool = Field(True, description="Prefer replicas that hold the requested LoRA adapter.")
    ring_vnodes: int = Field(64, ge=1, description="Virtual nodes per replica on the hash ring.")
    bounded_load_factor: float = Field(1.25, ge=1.0, description="A replica on the ring takes a session only "
                                                                 "while its load <= factor x mean load.")
    queue_weight: float = Field(1.0, ge=0, description="Least-load score: weight of queue length.")
    running_weight: float = Field(0.5, ge=0, description="Least-load score: weight of running sequences.")
    inflight_weight: float = Field(1.0, ge=0, description="Least-load score: weight of the gateway's own "
                                                          "in-flight requests to the replica.")
    kv_weight: float = Field(2.0, ge=0, description="Least-load score: weight of KV used share (0..1).")
    throughput_weight: float = Field(0.0, ge=0, description="Least-load score: bonus per 1000 tokens/s.")
    chars_per_token: float = Field(3.0, gt=0, description="Prompt size estimate for the KV headroom check.")


class RetrySection(Section):
    max_attempts: int = Field(3, ge=1, description="Attempts before the first byte (normal priority).")
    max_attempts_critical: int = Field(5, ge=1, description="Attempts for X-Priority: critical.")
    max_attempts_batch: int = Field(2, ge=1, description="Attempts for X-Priority: batch.")
    backoff_initial_ms: float = Field(10.0, ge=0, description="First backoff before a retry.")
    backoff_max_ms: float = Field(500.0, ge=0, description="Largest backoff.")
    backoff_multiplier: float = Field(2.0, ge=1, description="Backoff growth per attempt.")
    budget_ratio: float = Field(0.2, ge=0, le=1, description="Retries may add at most this share of requests.")
    budget_min_per_s: float = Field(5.0, ge=0, description="Retries always allowed per second (low traffic).")
    budget_window_s: float = Field(10.0, gt=0, description="Window the retry budget is measured over.")
    max_failovers: int = Field(3, ge=0, description="Mid-stream resumptions per request.")
    hedge_critical: bool = Field(True, description="Critical requests send a second copy after the hedge delay.")
    hedge_delay_min_ms: float = Field(20.0, ge=0, description="Floor of the hedge delay (observed p95 TTFT).")
    hedge_delay_max_ms: float = Field(2000.0, ge=0, description="Ceiling of the hedge delay.")


class DegradationSection(Section):
    fallback_models: dict[str, str] = Field(default_factory=dict, description="Model -> fallback model group "
                                                                               "used when the model has no capacity.")
    overload_inflight_per_replica: int = Field(64, ge=1, description="Gateway in-flight requests per healthy "
                                                                     "replica above which capacity is short.")
    clamp_max_tokens: int = Field(256, ge=1, description="When short, non-critical max_tokens is clamped to this.")
    queue_max_depth: int = Field(128, ge=0, description="Requests that may wait for capacity (0 = no queue).")
    queue_timeout_s: float = Field(5.0, gt=0, description="Longest a request waits in the queue.")
    shed_batch_at_fraction: float = Field(0.75, gt=0, le=1, description="Batch requests are shed once in-flight "
                                                                         "passes this share of capacity.")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with 429/503 sheds.")


class ApiKeySection(Section):
    name: str = Field(..., description="A label for metrics and logs.")
    sha256: str = Field(..., description="Hex SHA-256 of the key (never the key itself).")
    requests_per_minute: int = Field(0, ge=0, description="Request limit (0 = unlimited).")
    tokens_per_minute: int = Field(0, ge=0, description="Completion + prompt token limit (0 = unlimited).")

    @field_validator("sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        v = v.strip().lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 64 hex characters (sha256 of the key)")
        return v


class AuthSection(Section):
    enabled: bool = Field(False, description="Require 'Authorization: Bearer KEY' on /v1/*.")
    api_keys: list[ApiKeySection] = Field(default_factory=list, description="Accepted keys, hashed.")
    admin_key_sha256: str = Field("", description="Hex SHA-256 of the admin key for /admin/* (empty = admin "
                                                  "API open only when auth is disabled).")


class StreamsSection(Section):
    resumable: bool = Field(True, description="Give every SSE event an id and keep each stream's state so "
                                              "that a client can resume it on any gateway (Last-Event-ID).")
    state_write_interval_ms: int = Field(50, gt=0, description="How often running streams' new tokens are "
                                                               "written behind the relay to Redis.")
    state_ttl_s: int = Field(600, gt=0, description="How long a stream stays resumable after its last write.")
    state_queue_max: int = Field(4096, gt=0, description="Ended streams waiting for their last write (more are "
                                                         "dropped and counted; the relay never waits).")
    max_stream_tokens: int = Field(65536, gt=0, description="Largest token count accepted when reading a "
                                                            "stream's state back from Redis.")
    max_local_streams: int = Field(10000, gt=0, description="Ended streams kept in this process for "
                                                            "same-gateway resumes (oldest dropped first).")
    idempotency_window_s: int = Field(300, gt=0, description="A non-stream request repeated with the same "
                                                             "X-Request-ID and body within this time gets "
                                                             "the first answer instead of a new generation.")
    max_answer_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest non-stream answer kept for "
                                                                      "repeats (larger ones are not shared).")


class MetricsSection(Section):
    enabled: bool = Field(True, description="Serve /metrics.")


class GatewayConfig(Section):
    """``configs/gateway.yaml``."""

    server: ServerSection = Field(default_factory=ServerSection)
    replicas: ReplicasSection = Field(default_factory=ReplicasSection)
    redis: RedisSection = Field(default_factory=RedisSection)
    health: HealthSection = Field(default_factory=HealthSection)
    breaker: BreakerSection = Field(default_factory=BreakerSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    retry: RetrySection = Field(default_factory=RetrySection)
    degradation: DegradationSection = Field(default_factory=DegradationSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    streams: StreamsSection = Field(default_factory=StreamsSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)

    @model_validator(mode="after")
    def _check(self) -> "GatewayConfig":
        if self.routing.policy not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy {self.routing.policy!r}; supported: {', '.join(POLICY_NAMES)}")
        if self.health.unhealthy_after_misses < self.health.suspect_after_misses:
            raise ValueError("health.unhealthy_after_misses must be >= health.suspect_after_misses")
        return self


def sha256_hex(key: str) -> str:
    """How keys are configured: ``python -c "import hashlib;print(hashlib.sha256(b'KEY').hexdigest())"``."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_gateway_config(path: str | None = None, overrides: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> GatewayConfig:
    return load_config(GatewayConfig, path, env_prefix=ENV_PREFIX, overrides=overrides, environ=environ)
