"""llama.cpp's ``llama-server`` (followed: tools/server/README.md of llama.cpp b6xxx, 2025) and
llama-cpp-python's server (followed: llama-cpp-python 0.3.x, ``llama_cpp.server``).

- ``llama-server``: detected by ``GET /props`` (``default_generation_settings``, ``total_slots``);
  health ``GET /health`` (503 while loading); load from ``GET /metrics`` (with ``--metrics``):
  ``llamacpp:requests_processing`` / ``llamacpp:requests_deferred``, KV
  ``llamacpp:kv_cache_usage_ratio`` (older builds; newer ones drop it: no KV signal then); without
  ``--metrics``, running = the slots ``GET /slots`` shows processing (``is_processing``);
- llama-cpp-python's server has no ``/health`` or ``/metrics``: it is seen alive by ``/v1/models``
  and routed on the gateway's in-flight count;
- resume: completions by appending the partial text to the prompt; chat ``none`` (llama-cpp-python
  formats a trailing assistant message as a finished turn, so a prefix would restart the answer);
- requests carry ``repeat_penalty: 1.0`` (``gateway/resume.py`` ``for_engine``): llama-cpp-python's
  default is 1.1, which makes a greedy answer differ from the model's own ``generate()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway.backends.base import BACKENDS, BackendTraits, ProbeError, ResumeMode
from gateway.backends.engine import EngineProbe, get_body

if TYPE_CHECKING:
    import aiohttp

    from unbroken.contract.heartbeat import ReplicaStateReport


@BACKENDS.register("llamacpp")
class LlamaCppProbe(EngineProbe):
    kind = "llamacpp"
    traits = BackendTraits(
        resume_chat=ResumeMode.NONE, resume_completions=ResumeMode.TEXT,
        load_signal="llamacpp:requests_processing + llamacpp:requests_deferred (llama-server --metrics; "
                    "else processing /slots)",
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
        report = await super().poll(session, url)
        if self.has_health and self.has_metrics is False:  # llama-server without --metrics
            report = await self._with_slots(session, url, report)
        return report

    async def _with_slots(self, session: aiohttp.ClientSession, url: str,
                          report: ReplicaStateReport) -> ReplicaStateReport:
        try:
            code, body = await get_body(session, url + "/slots")
            slots = orjson.loads(body) if code == 200 else None
        except (ProbeError, orjson.JSONDecodeError):
            return report
        if isinstance(slots, list):
            running = sum(1 for s in slots[:1024] if isinstance(s, dict) and (
                s.get("is_processing") is True or s.get("state") == 1))
            report.num_running = running
            report.queue_length = running + report.num_waiting
        return report
