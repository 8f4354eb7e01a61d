"""llama.cpp's ``llama-server`` (followed: tools/server/README.md of llama.cpp b6xxx, 2025) and
llama-cpp-python's server (followed: llama-cpp-python 0.3.x, ``llama_cpp.server``).

- ``llama-server``: detected by ``GET /props`` (``default_generation_settings``, ``total_slots``);
  health ``GET /health`` (503 while loading); load from ``GET /metrics`` (with ``--metrics``):
  ``llamacpp:requests_processing`` / ``llamacpp:requests_deferred``, KV
  ``llamacpp:kv_cache_usage_ratio`` (older builds; newer ones drop it: no KV signal then);
- llama-cpp-python's server has no ``/health`` or ``/metrics``: it is seen alive by ``/v1/models``
  and routed on the gateway's in-flight count;
- resume: completions by appending the partial text to the prompt; chat ``none`` (llama-cpp-python
  formats a trailing assistant message as a finished turn, so a prefix would restart the answer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.backends import BACKENDS, BackendTraits, ResumeMode
from gateway.backends.engine import EngineProbe, get_body

if TYPE_CHECKING:
    import aiohttp

    from unbroken.contract.heartbeat import ReplicaStateReport


@BACKENDS.register("llamacpp")
class LlamaCppProbe(EngineProbe):
    kind = "llamacpp"
    traits = BackendTraits(
        resume_chat=ResumeMode.NONE, resume_completions=ResumeMode.TEXT,
        load_signal="llamacpp:requests_processing + llamacpp:requests_deferred (llama-server --metrics)",
        kv_signal="llamacpp:kv_cache_usage_ratio (older llama-server)", adapters=False,
        version_source="GET /props",
    )
    running_metrics = ("llamacpp:requests_processing",)
    waiting_metrics = ("llamacpp:requests_deferred",)
    kv_metrics = ("llamacpp:kv_cache_usage_ratio",)

    def __init__(self) -> None:
        super().__init__()
        self.has_health: bool | None = None

    async def poll(self, session: aiohttp.ClientSession, url: str) -> ReplicaStateReport:
        if self.has_health is None:  # llama-cpp-python's server has no /health: fall back to /v1/models
            code, _ = await get_body(session, url + "/health")
            self.has_health = code in (200, 503)
            if not self.has_health:
                self.health_path = ""  # type: ignore[misc]
                self.metrics_path = None  # type: ignore[misc]
                self.models = []
        return await super().poll(session, url)
