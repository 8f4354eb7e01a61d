"""The gateway's typed configuration (``configs/gateway.yaml``, env ``UNBROKEN_GATEWAY__SECTION__FIELD``).

One section per concern; every field has a default, a description and its unit in its name.
:func:`load_gateway_config` is called once, at the entry point.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any, Mapping

from pydantic import Field, field_validator, model_validator

from unbroken.config import ConfigError, Section, load_config

# The policies gateway/policies registers (a test holds the two equal); named here so that the
# config does not import the policies, which import the config.
POLICY_NAMES = ("least_load", "power_of_two", "round_robin")
# The replica kinds of gateway/backends/ (a test checks the registry holds exactly these) and the
# resume modes (docs/backends.md).
KIND_NAMES = ("auto", "llamacpp", "openai", "sglang", "tgi", "unbroken", "vllm")
RESUME_MODES = ("token", "text", "none")


def _check_kind(kind: str) -> None:
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown replica kind {kind!r}; supported: {', '.join(KIND_NAMES)}")

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
    body_read_timeout_s: float = Field(30.0, gt=0, description="A request body that has not fully arrived "
                                                               "within this time is answered 408.")
    allow_public_without_auth: bool = Field(
        False, description="Start even when bound to a non-loopback address with auth.enabled false. Without "
                           "it such a gateway refuses to start: every caller would share one trust domain.")


class ReplicasSection(Section):
    urls: list[str] = Field(default_factory=list, description="Static replica base URLs (http://host:port).")
    shared_token: str = Field("", description="Bearer token sent to replicas (they check it); empty = none.")
    connect_timeout_s: float = Field(1.0, gt=0, description="TCP connect timeout to a replica.")
    kind: str = Field("auto", description="Kind of the static replicas: auto (ask each server what it is) | "
                                          "unbroken | vllm | sglang | tgi | llamacpp | openai. See docs/backends.md.")
    kinds: dict[str, str] = Field(default_factory=dict, description="Per-URL kind, overriding 'kind' "
                                                                    "(URL -> kind).")
    resume: dict[str, str] = Field(default_factory=dict, description="Per-kind resume mode override "
                                   "(kind -> token | text | none), e.g. {vllm: none} to never continue a "
                                   "partial answer by text.")
    tokenizers: dict[str, str] = Field(default_factory=dict, description="Model name -> directory with its "
                                       "tokenizer.json and tokenizer_config.json (chat template there or in "
                                       "chat_template.jinja). A stream for "
                                       "such a model goes to vLLM and SGLang replicas by token ids and resumes "
                                       "token-exact (needs the 'tokens' extra). See docs/backends.md.")
    first_byte_timeout_s: float = Field(60.0, gt=0, description="First-token timeout: the longest wait for a "
                                        "replica's response headers and its first token (prefill of a long "
                                        "prompt); past it the attempt fails over to another replica.")
    retry_after_default_s: float = Field(1.0, ge=0, description="A replica's 429 without Retry-After keeps it "
                                         "out of routing this long.")
    retry_after_max_s: float = Field(60.0, ge=0, description="Cap on the Retry-After a replica may ask for.")
    stall_timeout_s: float = Field(5.0, gt=0, description="A stream with no chunk for this long is stalled: "
                                                          "the gateway fails it over.")
    nonstream_timeout_s: float = Field(120.0, gt=0, description="Longest a non-stream replica call may take.")
    no_replica_wait_s: float = Field(5.0, ge=0, description="When no replica can take a request (or a stream "
                                     "to resume) right now, keep trying this long (within the deadline) "
                                     "before giving up: a replica coming back or a half-open breaker "
                                     "letting work through again is often a moment away.")
    max_connections_per_replica: int = Field(256, gt=0, description="Pooled connections per replica.")
    standby_urls: list[str] = Field(default_factory=list, description="Warm standby replicas: loaded and "
                                    "heartbeating but never routed to until one is promoted in place of a "
                                    "replica declared unhealthy (the failed one becomes the standby when it "
                                    "is back).")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        _check_kind(v)
        return v

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: dict[str, str]) -> dict[str, str]:
        for kind in v.values():
            _check_kind(kind)
        return {url.rstrip("/"): kind for url, kind in v.items()}

    @field_validator("resume")
    @classmethod
    def _known_modes(cls, v: dict[str, str]) -> dict[str, str]:
        for kind, mode in v.items():
            _check_kind(kind)
            if mode not in RESUME_MODES:
                raise ValueError(f"resume[{kind!r}] must be token, text or none, got {mode!r}")
        return v


class RedisSection(Section):
    url: str = Field("", description="Redis for discovery, session placement and shared limits (empty = off).")
    discovery_interval_ms: int = Field(500, gt=0, description="How often to SCAN the replica registry.")
    key_prefix: str = Field("unbroken:", description="Prefix of every key the gateway reads or writes.")
    session_ttl_s: int = Field(3600, gt=0, description="Lifetime of a recorded session placement override.")
    op_timeout_s: float = Field(0.5, gt=0, description="Timeout for one Redis operation; Redis being slow "
                                                       "or gone never fails a request.")
    registry_allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1", "localhost"],
        description="Replica URLs found in the Redis registry are used only when their host is one of these "
                    "(host names, IP addresses or CIDR ranges); others are skipped and counted. Redis is not "
                    "trusted: a writer could otherwise send traffic, with the replica token, anywhere.")

    @field_validator("registry_allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if "/" in h:
                ipaddress.ip_network(h, strict=False)  # raises ValueError naming the bad range
        return v


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
    max_chars_per_token: float = Field(
        16.0, ge=0, description="Upper bound of characters per token: a prompt whose characters divided by this "
                                "exceed every serving replica's reported max_model_len is answered 400 "
                                "context_length_exceeded by the gateway at once (0 = leave it to the replica).")


class StabilitySection(Section):
    enabled: bool = Field(True, description="Weigh routing by each replica's recent stability.")
    half_life_s: float = Field(30.0, gt=0, description="Every incident's weight halves after this long.")
    failure_weight: float = Field(1.0, ge=0, description="Score added when the replica is declared unhealthy.")
    stall_weight: float = Field(0.5, ge=0, description="Score added when it turns suspect (missed heartbeat).")
    restart_weight: float = Field(1.0, ge=0, description="Score added when its process restarted (new pid).")
    breaker_trip_weight: float = Field(1.0, ge=0, description="Score added per breaker trip.")
    jitter_weight: float = Field(1.0, ge=0, description="Score per second of standard deviation of the "
                                                        "heartbeat round trip over the window.")
    jitter_window: int = Field(32, ge=2, description="Heartbeat round trips kept for the jitter.")
    jitter_floor_ms: float = Field(50.0, ge=0, description="Jitter below this is normal (a busy CPU "
                                                           "delays every heartbeat a little) and adds nothing.")
    unstable_score: float = Field(0.75, gt=0, description="At or above this score a replica is unstable: "
                                                          "critical requests avoid it while another can serve.")


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
    context_fallback_models: dict[str, str] = Field(
        default_factory=dict, description="Model -> larger-context model group: a request a replica refuses "
                                          "with context_length_exceeded is sent there (never resent unchanged).")
    error_fallback_models: dict[str, list[str]] = Field(
        default_factory=dict, description="Model -> models to try, in order, when every attempt on the model "
                                          "failed (replica errors, no replica), not only when capacity is short.")
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
    tokens_per_minute: int = Field(0, ge=0, description="Completion + prompt token limit (0 = unlimited); each "
                                                        "request reserves its prompt estimate + max_tokens up "
                                                        "front and is charged what it used at the end.")
    max_concurrent_requests: int = Field(0, ge=0, description="Requests (streams included) this key may have "
                                                              "in flight at once; more get 429 (0 = unlimited).")
    allow_critical: bool = Field(False, description="Whether this key may send 'X-Priority: critical' (hedged, "
                                                    "more attempts, head of the queue); others get 403.")

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
    session_secret: str = Field("", description="HMAC key that scopes X-Session-ID to the API key (the replica "
                                                "sees only the derived id); the same on every gateway. Empty = "
                                                "derived from replicas.shared_token and the key hashes (the same "
                                                "on gateways with the same config, but not secret without a "
                                                "replica token).")
    session_id_max_chars: int = Field(128, ge=1, le=1024, description="Longest X-Session-ID accepted (400 above).")


class StreamsSection(Section):
    resumable: bool = Field(True, description="Give every SSE event an id and keep each stream's state so "
                                              "that a client can resume it on any gateway (Last-Event-ID).")
    state_write_interval_ms: int = Field(50, gt=0, description="How often running streams' new tokens are "
                                                               "written behind the relay to Redis.")
    state_write_behind: bool = Field(True, description="Write running streams' state behind the relay to Redis "
                                                       "(off: a stream is resumable only on the gateway that "
                                                       "relays it, as when Redis is down; for one gateway, no "
                                                       "Redis write per stream).")
    state_write_on_open: bool = Field(True, description="Write a stream's state to Redis as it opens (off: "
                                                        "from its first write interval on; a stream younger "
                                                        "than that is resumable only on its own gateway, and "
                                                        "short streams cost no Redis write at all).")
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
    stability: StabilitySection = Field(default_factory=StabilitySection)
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


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: GatewayConfig) -> None:
    """Refuse a gateway bound beyond loopback without auth, unless ``server.allow_public_without_auth``."""
    if config.auth.enabled or config.server.allow_public_without_auth or is_loopback_host(config.server.host):
        return
    raise ConfigError(f"server.host = {config.server.host!r} is reachable from other machines and auth.enabled is "
                      "false: anyone could use it. Turn auth on (auth.api_keys), bind to 127.0.0.1, or set "
                      "server.allow_public_without_auth: true to run it open on purpose.")


def sha256_hex(key: str) -> str:
    """How keys are configured: ``python -c "import hashlib;print(hashlib.sha256(b'KEY').hexdigest())"``."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_gateway_config(path: str | None = None, overrides: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> GatewayConfig:
    config = load_config(GatewayConfig, path, env_prefix=ENV_PREFIX, overrides=overrides, environ=environ)
    check_exposure(config)
    return config
