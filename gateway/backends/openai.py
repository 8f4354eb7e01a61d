"""Any other OpenAI-compatible server (followed: OpenAI's API reference for ``/v1/models`` and
chat/completions streaming): alive when ``GET /v1/models`` answers, routed on the gateway's own
in-flight count, resumed ``none`` (it promises no way to continue a partial answer)."""

from __future__ import annotations

from gateway.backends.base import BACKENDS, BackendTraits, ResumeMode
from gateway.backends.engine import EngineProbe


@BACKENDS.register("openai")
class OpenAIProbe(EngineProbe):
    kind = "openai"
    traits = BackendTraits(resume_chat=ResumeMode.NONE, resume_completions=ResumeMode.NONE,
                           load_signal="gateway in-flight only", kv_signal="", version_source="")
    health_path = ""
    metrics_path = None
