"""The replica's typed configuration (``configs/replica.yaml``, env ``UNBROKEN_REPLICA__SECTION__FIELD``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unbroken.config import Section


class ServerSection(Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8001, ge=0, le=65535, description="TCP port to listen on (0 = any free port).")
    replica_id: str = Field("", description="Name in heartbeats and X-Replica-ID; empty = host:port.")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest accepted request body, in bytes.")
    shared_token: str = Field(
        "", description="When set, every route but /health needs 'Authorization: Bearer <token>' (the "
                        "gateway's replica token). Set it by env (UNBROKEN_REPLICA__SERVER__SHARED_TOKEN) "
                        "or the config file, not on the command line.")
    allow_insecure: bool = Field(
        False, description="Listen on a non-loopback host without a shared_token (refused otherwise).")
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings one request may carry (400 past it).")
    max_stop_string_chars: int = Field(
        256, gt=0, description="Longest stop string, in characters (400 past it); the detokenizer holds "
                               "back at most this much text.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long running streams may finish.")
    drain_retry_after_s: float = Field(2.0, ge=0, description="Retry-After sent with 503 while draining.")


class ModelSection(Section):
    path: str = Field("models/tiny-qwen", description="Checkpoint directory (or hub id where a hub is reachable).")
    served_name: str = Field("qwen", description="Model name clients send; adapters are 'NAME:ADAPTER'.")
    revision: str = Field("", description="Revision tag in the KV identity; empty = a hash of config.json.")
    quantization: Literal["nf4", "none"] = Field("nf4", description="bitsandbytes NF4 4-bit, or full precision.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype: auto = bfloat16 on CUDA, float32 on the CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present.")
    max_model_len: int = Field(4096, gt=0, description="Longest prompt + completion, in tokens.")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters: name -> local directory.")
    num_threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default).")
    cpu_bf16_kernel: bool = Field(
        False, description="On CPUs with AVX512-BF16, run NF4 layers in bitsandbytes' fused bfloat16 "
                           "kernel: faster, but its rounding makes greedy tokens depend on what else is "
                           "in the batch, so exact resume and equality with generate() no longer hold.")


class EngineSection(Section):
    max_num_seqs: int = Field(64, gt=0, description="Most sequences decoding at once.")
    max_prefill_tokens_per_step: int = Field(
        512, gt=0, description="Prompt tokens prefilled per engine step; longer prompts are chunked.")
    kv_cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="KV budget on the CPU, in bytes (running sequences and kept sessions).")
    kv_cache_memory_fraction: float = Field(
        0.8, gt=0, le=1, description="On CUDA: share of free device memory after loading used for KV.")
    max_kept_sessions: int = Field(256, ge=0, description="Sessions whose KV is kept between turns (LRU).")


class KVSyncSection(Section):
    enabled: bool = Field(False, description="Replicate session KV through the kvsync sidecar.")
    sidecar_url: str = Field("http://127.0.0.1:8201", description="The local kvsync sidecar.")
    snapshot_every_tokens: int = Field(64, ge=0, description="During a generation, snapshot every N tokens (0 = only after each turn).")
    block_tokens: int = Field(64, gt=0, description="Tokens per KV block (must equal the sidecar's).")
    fetch_timeout_s: float = Field(2.0, gt=0, description="Longest wait for a restore before re-prefill.")
    token: str = Field(
        "", description="Bearer token sent to the sidecar (its auth.token); set it by env "
                        "(UNBROKEN_REPLICA__KVSYNC__TOKEN) or the config file.")
    shared_memory: bool = Field(
        True, description="Take restored snapshots from the sidecar as a shared-memory file when it "
                          "offers one (same host); off = always as an HTTP body.")


class RegistrySection(Section):
    redis_url: str = Field("", description="Announce this replica in Redis for gateways to find (empty = off).")
    advertise_url: str = Field("", description="URL gateways use to reach this replica; empty = http://host:port.")
    ttl_s: float = Field(3.0, gt=0, description="Registration lifetime; renewed every ttl_s/3.")
    key_prefix: str = Field("unbroken:", description="Prefix of the registry key (the gateway's redis.key_prefix), "
                                                     "so that two deployments can share one Redis.")


class ReplicaConfig(Section):
    server: ServerSection = Field(default_factory=ServerSection)
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    kvsync: KVSyncSection = Field(default_factory=KVSyncSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
