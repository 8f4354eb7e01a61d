"""The heartbeat: what a replica reports at ``GET /state`` and the gateway reads, with its one
builder (:meth:`ReplicaStateReport.to_dict`) and its one parser (:meth:`ReplicaStateReport.from_dict`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    sessions: list[str]
    max_model_len: int
    started_at_s: float
    num_preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The ``/state`` JSON body (the one builder: the replica and the mock replica serve this)."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReplicaStateReport":
        """Parse a ``/state`` body leniently: unknown fields are ignored, missing ones defaulted."""
        return cls(
            replica_id=str(data.get("replica_id") or ""),
            pid=int(data.get("pid") or 0),
            model=str(data.get("model") or ""),
            adapters=[str(a) for a in (data.get("adapters") or [])],
            quantization=str(data.get("quantization") or ""),
            dtype=str(data.get("dtype") or ""),
            device=str(data.get("device") or ""),
            status=str(data.get("status") or "ready"),
            queue_length=int(data.get("queue_length") or 0),
            num_running=int(data.get("num_running") or 0),
            num_waiting=int(data.get("num_waiting") or 0),
            kv_bytes_used=int(data.get("kv_bytes_used") or 0),
            kv_bytes_free=int(data.get("kv_bytes_free") or 0),
            kv_bytes_per_token=int(data.get("kv_bytes_per_token") or 0),
            device_memory_free_bytes=int(data.get("device_memory_free_bytes") or 0),
            tokens_per_s=float(data.get("tokens_per_s") or 0.0),
            sessions=[str(s) for s in (data.get("sessions") or [])],
            max_model_len=int(data.get("max_model_len") or 0),
            started_at_s=float(data.get("started_at_s") or 0.0),
            num_preemptions=int(data.get("num_preemptions") or 0),
        )
