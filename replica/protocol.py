"""Typed messages that cross the replica's boundaries.

- HTTP layer -> engine: :class:`GenerationRequest` (with :class:`SamplingParams`).
- engine -> HTTP layer: :class:`TokenOutput` per generated token (ids only; text is made by the
  HTTP side's detokenizer so the engine loop stays on token ids).
- replica -> gateway heartbeat: :class:`ReplicaStateReport` (``GET /state``).
- replica <-> kvsync: :class:`KVIdentity` and :class:`KVSnapshot` (see ``kvsync/protocol.py`` for the
  wire form).

HTTP extensions to OpenAI's API that the gateway relies on (request body fields):
- ``min_tokens`` / ``ignore_eos``: vLLM-style, for fixed-length benchmarks.
- ``resume_token_ids``: completion token ids already delivered to the client. The replica appends
  them to the prompt and continues from output position ``len(resume_token_ids)``; ``max_tokens``
  counts them. Seeded sampling draws position ``k`` from ``(seed, k)``, so a resumed generation
  continues exactly as the uninterrupted one would have.
Response extension: every choice (stream chunk or full response) carries ``token_ids``: the ids of
exactly the tokens whose text is in that choice's content. Text held back (an incomplete UTF-8
character, a possible stop-string prefix) is reported with its ids when it is released.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"  # the client went away or the caller aborted
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` (or ``top_k == 1``) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class GenerationRequest:
    """One sequence to generate. ``prompt_token_ids`` excludes ``resume_token_ids``."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None = base model
    session_id: str | None = None
    resume_token_ids: list[int] = field(default_factory=list)
    arrival_s: float = 0.0


@dataclass(frozen=True)
class TokenOutput:
    """One engine step's result for one request: a new token, and/or the end."""

    request_id: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    # Prompt tokens whose KV came from a kept session or an imported snapshot (first output only).
    num_cached_prompt_tokens: int = 0
    # Where the cached prompt KV came from: "session" (kept here), "restored" (kvsync), or None.
    cache_source: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class KVIdentity:
    """What a KV cache belongs to; an import whose identity differs is refused."""

    model: str
    revision: str
    adapter: str | None
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "revision": self.revision,
            "adapter": self.adapter,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVIdentity":
        return cls(
            model=str(d["model"]),
            revision=str(d["revision"]),
            adapter=d.get("adapter"),
            dtype=str(d["dtype"]),
            num_layers=int(d["num_layers"]),
            num_kv_heads=int(d["num_kv_heads"]),
            head_dim=int(d["head_dim"]),
        )


@dataclass
class KVSnapshot:
    """A session's KV for ``token_ids``: ``keys[layer]``/``values[layer]`` are torch tensors of
    shape ``[num_kv_heads, len(token_ids), head_dim]`` (no batch dim). ``start`` > 0 means the
    tensors cover only ``token_ids[start:]`` (an incremental snapshot)."""

    session_id: str
    identity: KVIdentity
    token_ids: list[int]
    keys: list[Any]
    values: list[Any]
    start: int = 0
    transcript: list[dict[str, Any]] | None = None


@dataclass
class ReplicaStateReport:
    """The heartbeat payload served at ``GET /state``."""

    replica_id: str
    pid: int
    model: str
    adapters: list[str]
    quantization: str
    dtype: str
    device: str
    status: str  # "ready" | "loading" | "draining"
    queue_length: int  # waiting + running
    num_running: int
    num_waiting: int
    kv_bytes_used: int
    kv_bytes_free: int
    kv_bytes_per_token: int
    device_memory_free_bytes: int
    tokens_per_s: float
    num_sessions: int  # sessions whose KV this replica keeps (never their ids)
    max_model_len: int
    started_at_s: float
    num_preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
