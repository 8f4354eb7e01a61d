"""What every OpenAI-compatible engine's probe shares: a health route, ``GET /v1/models`` for the
models it serves (fetched again every ``MODELS_EVERY`` polls) and ``GET /metrics`` for load.

A kind names its routes and its metric names; this class turns them into the heartbeat report:
``num_running`` / ``num_waiting`` from the engine's gauges, and its KV use (a 0..1 share) as
``kv_bytes_used`` / ``kv_bytes_free`` on a scale of :data:`KV_SCALE` (the gateway routes on the
share; ``kv_bytes_per_token`` stays 0, so no per-prompt headroom is guessed). An engine without
metrics still routes: on the gateway's own in-flight count.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from gateway.backends.base import BackendTraits, ProbeError
from gateway.backends.prom import gauges
from unbroken.contract.heartbeat import ReplicaStateReport

if TYPE_CHECKING:
    import aiohttp

KV_SCALE = 1_000_000
MODELS_EVERY = 20
MAX_BODY_BYTES = 4 << 20  # engine answers are untrusted: bounded before parsing


async def get_body(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        body = await resp.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise ProbeError(f"{url} answered more than {MAX_BODY_BYTES} bytes")
        return resp.status, body


def json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProbeError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise ProbeError(f"{what} is not a JSON object")
    return obj


class EngineProbe:
    """Base of the engine kinds; subclasses set the class attributes."""

    kind: ClassVar[str] = ""
    traits: ClassVar[BackendTraits]
    health_path: ClassVar[str] = "/health"
    metrics_path: ClassVar[str | None] = "/metrics"
    running_metrics: ClassVar[tuple[str, ...]] = ()  # summed
    waiting_metrics: ClassVar[tuple[str, ...]] = ()
    kv_metrics: ClassVar[tuple[str, ...]] = ()  # the first present is used (newest name first)
    kv_is_percent: ClassVar[bool] = False  # the gauge is 0..100, not 0..1

    def __init__(self) -> None:
        self.version = ""
        self.models: list[str] = []
        self.max_model_len = 0
        self.num_polls = 0
        self.has_metrics: bool | None = None  # None until tried
        self.started_at_s = time.time()

    async def poll(self, session: aiohttp.ClientSession, url: str) -> ReplicaStateReport:
        status = "ready"
        if self.health_path:
            code, body = await get_body(session, url + self.health_path)
            if code == 503:
                status = "loading"
            elif code != 200:
                raise ProbeError(f"{self.health_path} answered {code}")
        if not self.health_path or not self.models or self.num_polls % MODELS_EVERY == 0:
            # (without a health route, the model list is the sign of life: every poll)
            await self.fetch_models(session, url)
        self.num_polls += 1
        running = waiting = 0.0
        kv_share: float | None = None
        if self.metrics_path and self.has_metrics is not False:
            running, waiting, kv_share = await self.fetch_load(session, url)
        return self.report(status, running, waiting, kv_share)

    async def fetch_models(self, session: aiohttp.ClientSession, url: str) -> None:
        code, body = await get_body(session, url + "/v1/models")
        if code != 200:
            raise ProbeError(f"/v1/models answered {code}")
        data = json_object(body, "/v1/models").get("data")
        if not isinstance(data, list):
            raise ProbeError("/v1/models has no 'data' list")
        models: list[str] = []
        for m in data[:256]:
            if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]:
                models.append(m["id"][:256])
                mml = m.get("max_model_len")
                if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0:
                    self.max_model_len = mml
        if not models:
            raise ProbeError("/v1/models lists no model")
        self.models = models

    async def fetch_load(self, session: aiohttp.ClientSession, url: str) -> tuple[float, float, float | None]:
        assert self.metrics_path is not None
        try:
            code, body = await get_body(session, url + self.metrics_path)
        except ProbeError:
            return 0.0, 0.0, None
        if code != 200:
            self.has_metrics = False  # not exposed (e.g. started without --metrics): route on in-flight
            return 0.0, 0.0, None
        self.has_metrics = True
        wanted = set(self.running_metrics) | set(self.waiting_metrics) | set(self.kv_metrics)
        g = gauges(body.decode("utf-8", "replace"), wanted)
        running = sum(g.get(n, 0.0) for n in self.running_metrics)
        waiting = sum(g.get(n, 0.0) for n in self.waiting_metrics)
        kv = next((g[n] for n in self.kv_metrics if n in g), None)
        if kv is not None:
            kv = min(1.0, max(0.0, kv / 100.0 if self.kv_is_percent else kv))
        return running, waiting, kv

    def report(self, status: str, running: float, waiting: float, kv_share: float | None) -> ReplicaStateReport:
        used = int(round((kv_share or 0.0) * KV_SCALE)) if kv_share is not None else 0
        free = KV_SCALE - used if kv_share is not None else 0
        num_running, num_waiting = max(0, int(running)), max(0, int(waiting))
        return ReplicaStateReport(
            replica_id="", pid=0, model=self.models[0] if self.models else "", adapters=[],
            quantization="", dtype="", device="", status=status,
            queue_length=num_running + num_waiting, num_running=num_running, num_waiting=num_waiting,
            kv_bytes_used=used, kv_bytes_free=free, kv_bytes_per_token=0, device_memory_free_bytes=0,
            tokens_per_s=0.0, num_sessions=0, max_model_len=self.max_model_len, started_at_s=self.started_at_s,
        )

    def served_models(self) -> list[str]:
        """Every model id the engine lists (several for an engine serving LoRA modules)."""
        return list(self.models)
