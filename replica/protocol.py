"""Typed messages that cross the replica's boundaries.

- HTTP layer -> engine: :class:`GenerationRequest` (with :class:`SamplingParams`).
- engine -> HTTP layer: :class:`TokenOutput` per generated token (ids only; text is made by the
  HTTP side's detokenizer so the engine loop stays on token ids).
The heartbeat report (``GET /state``) and the KV identity and snapshot types are the contract's
(``unbroken/contract/heartbeat.py``, ``unbroken/contract/kv.py``): the gateway and kvsync read them
there, not here.

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

from unbroken.contract.heartbeat import ReplicaStateReport
from unbroken.contract.kv import KVIdentity, KVSnapshot

__all__ = ["FinishReason", "GenerationRequest", "KVIdentity", "KVSnapshot", "ReplicaStateReport",
           "SamplingParams", "TokenOutput"]


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
