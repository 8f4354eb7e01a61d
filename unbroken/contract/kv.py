"""What a session's KV is and belongs to: the types the replica exports and imports and kvsync
stores (the binary wire form of a snapshot is ``kvsync/protocol.py``, spoken between kvsync's
client and its sidecar)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
