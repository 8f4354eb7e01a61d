"""Helpers for tests and benchmarks: start a sidecar process, make synthetic KV, wait for Redis."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import orjson
import torch

from unbroken.contract.kv import KVIdentity, KVSnapshot
from unbroken.procs import ManagedProcess, free_port, python_module_cmd

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_sidecar(redis_url: str, *, log_path: str | Path | None = None, port: int | None = None,
                  settings: Mapping[str, Any] | None = None, ready_timeout_s: float = 30.0) -> tuple[ManagedProcess, str]:
    """``python -m kvsync`` on a free port; ``settings`` are ``{"store.block_tokens": 8}`` style
    overrides passed as ``UNBROKEN_KVSYNC__...`` env. The caller stops it (by pid)."""
    port = port or free_port()
    env = {"UNBROKEN_KVSYNC__" + k.upper().replace(".", "__"): str(v) for k, v in (settings or {}).items()}
    proc = ManagedProcess(
        "kvsync", python_module_cmd("kvsync", "--port", str(port), "--redis-url", redis_url),
        log_path=log_path, env=env, ready_url=f"http://127.0.0.1:{port}/health", cwd=REPO_ROOT,
    ).start()
    try:
        proc.wait_ready(ready_timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc, f"http://127.0.0.1:{port}"


def synthetic_identity(num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8,
                       dtype: str = "float32", revision: str = "r1", adapter: str | None = None) -> KVIdentity:
    return KVIdentity("qwen", revision, adapter, dtype, num_layers, num_kv_heads, head_dim)


def synthetic_kv(identity: KVIdentity, num_tokens: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random per-layer K and V of ``[num_kv_heads, num_tokens, head_dim]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (identity.num_kv_heads, num_tokens, identity.head_dim)
    dtype = getattr(torch, identity.dtype)
    keys = [torch.randn(shape, generator=g).to(dtype) for _ in range(identity.num_layers)]
    values = [torch.randn(shape, generator=g).to(dtype) for _ in range(identity.num_layers)]
    return keys, values


def snapshot_of(session_id: str, identity: KVIdentity, token_ids: list[int], keys: list[torch.Tensor],
                values: list[torch.Tensor], start: int = 0,
                transcript: list[dict[str, Any]] | None = None) -> KVSnapshot:
    """A snapshot of ``token_ids`` from full-length ``keys``/``values``, cut at ``start``."""
    return KVSnapshot(session_id, identity, list(token_ids), [k[:, start:len(token_ids)].clone() for k in keys],
                      [v[:, start:len(token_ids)].clone() for v in values], start=start, transcript=transcript)


def sidecar_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/v1/state", timeout=5) as r:
        return orjson.loads(r.read())


def wait_replicated(url: str, timeout_s: float = 20.0, client: Any = None) -> None:
    """Until the client's queue is empty and the sidecar has nothing pending for Redis."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        in_flight = client is not None and client.num_in_flight > 0
        if not in_flight and sidecar_state(url)["pending_sessions"] == 0:
            return
        time.sleep(0.02)
    raise TimeoutError(f"sidecar {url} still has pending writes after {timeout_s}s: {sidecar_state(url)}")


def metric_value(url: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample from the sidecar's ``/metrics`` (0 when absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    want = name
    if labels:
        want += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0
