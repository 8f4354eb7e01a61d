"""Hugging Face text-generation-inference (followed: TGI v3 docs, "Metrics" reference and the
Messages API).

- detected by ``GET /info`` (``model_id``, ``version``, ``max_total_tokens``);
- health ``GET /health``; models ``GET /v1/models``;
- load ``tgi_batch_current_size`` (running) and ``tgi_queue_size`` (waiting); TGI exports no KV
  share, so routing weighs running + waiting and the gateway's own in-flight count;
- resume: TGI's chat API takes no assistant prefix, so chat streams resume ``none`` (fail over
  before the first byte; an error event after it); completions resume by prompt.
- errors: ``{"error": "...", "error_type": "validation" | "overloaded" | ...}`` (422 / 429),
  turned into OpenAI's form by :mod:`gateway.backends.errors`.
"""

from __future__ import annotations

from gateway.backends.base import BACKENDS, BackendTraits, ResumeMode
from gateway.backends.engine import EngineProbe


@BACKENDS.register("tgi")
class TGIProbe(EngineProbe):
    kind = "tgi"
    traits = BackendTraits(
        resume_chat=ResumeMode.NONE, resume_completions=ResumeMode.TEXT,
        load_signal="tgi_batch_current_size + tgi_queue_size", kv_signal="",
        adapters=True, version_source="GET /info",
    )
    running_metrics = ("tgi_batch_current_size",)
    waiting_metrics = ("tgi_queue_size",)
    kv_metrics = ()
