"""The sidecar's typed configuration (``configs/kvsync.yaml``, env ``UNBROKEN_KVSYNC__SECTION__FIELD``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from unbroken.config import Section


class ServerSection(Section):
    host: str = Field("127.0.0.1", description="Address to listen on (loopback: only the local replica talks to it).")
    port: int = Field(8201, ge=0, le=65535, description="TCP port to listen on (0 = any free port).")
    max_body_bytes: int = Field(
        4 * 1024 * 1024 * 1024, gt=0, description="Largest snapshot a replica may post, in bytes.")
    handoff_dir: str = Field(
        "/dev/shm", description="A tmpfs where a restored snapshot is handed to a replica on this host "
                                "as a shared-memory file instead of an HTTP body (empty = always HTTP).")


class AuthSection(Section):
    token: str = Field(
        "", description="When set, every route but /health needs 'Authorization: Bearer <token>' (the "
                        "replica's kvsync.token). Set it by env (UNBROKEN_KVSYNC__AUTH__TOKEN) or the "
                        "config file, never on the command line.")
    mac_secret: str = Field(
        "", description="Key of the HMAC-SHA256 that authenticates every block and manifest in Redis "
                        "(env UNBROKEN_KVSYNC__AUTH__MAC_SECRET). Every sidecar sharing a Redis needs the "
                        "same one; empty = data in Redis is only checked for accidents, not forgery.")
    allow_insecure: bool = Field(
        False, description="Start anyway when listening on a non-loopback host without a token, or using "
                           "a non-loopback Redis without a mac_secret (refused otherwise).")


class RedisSection(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="The Redis that holds blocks and manifests.")
    key_prefix: str = Field("unbroken:kv", description="Prefix of every key kvsync writes.")
    socket_timeout_s: float = Field(5.0, gt=0, description="Timeout of one Redis command's socket reads/writes.")
    connect_timeout_s: float = Field(1.0, gt=0, description="Timeout of connecting to Redis.")
    retry_backoff_base_s: float = Field(0.1, gt=0, description="First wait after a failed write, doubled per failure.")
    retry_backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between write retries while Redis is down.")


class StoreSection(Section):
    block_tokens: int = Field(64, gt=0, description="Tokens per KV block (the replica's kvsync.block_tokens must match).")
    ttl_s: float = Field(3600.0, gt=0, description="Lifetime of a session's snapshot after its last write.")
    max_memory_bytes: int = Field(
        2 * 1024 * 1024 * 1024, ge=0,
        description="Cap on the Redis bytes kvsync's sessions use; least recently used sessions are "
                    "evicted past it (0 = no cap, TTL only).")
    compression: Literal["none", "zlib", "lz4"] = Field(
        "none", description="Per-block compression (lz4 needs the lz4 package). KV of float tensors "
                            "compresses poorly; 'none' is fastest.")
    compression_level: int = Field(1, ge=0, le=12, description="Compression level (zlib 0-9, lz4 0-12).")
    max_session_tokens: int = Field(
        131072, gt=0, description="Longest session a restore reads back, in tokens (a manifest naming more "
                                  "is refused before anything is allocated; the replica also caps it at its "
                                  "max_model_len).")

    @field_validator("compression")
    @classmethod
    def _compression_installed(cls, v: str) -> str:
        from kvsync.blocks import compression_available

        if not compression_available(v):
            raise ValueError(f"compression {v!r} needs a package that is not installed")
        return v


class WriterSection(Section):
    max_pending_bytes: int = Field(
        2 * 1024 * 1024 * 1024, gt=0,
        description="Snapshot bytes held in memory waiting for Redis; past it new snapshots are "
                    "refused (busy) and the replica sends a full one later.")
    max_tracked_sessions: int = Field(
        4096, gt=0, description="Sessions whose block chain the sidecar remembers for incremental snapshots (LRU).")
    fetch_timeout_s: float = Field(10.0, gt=0, description="Longest a restore may spend reading Redis.")


class KVSyncConfig(Section):
    server: ServerSection = Field(default_factory=ServerSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    redis: RedisSection = Field(default_factory=RedisSection)
    store: StoreSection = Field(default_factory=StoreSection)
    writer: WriterSection = Field(default_factory=WriterSection)
