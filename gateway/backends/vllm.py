"""vLLM's OpenAI server (followed: vLLM v0.11 docs, "Production Metrics" and the OpenAI-compatible
server; names checked against the v0.32 metrics page).

- detected by ``GET /version`` -> ``{"version": "0.x.y"}``;
- health ``GET /health`` (200, empty body), models ``GET /v1/models`` (with ``max_model_len``);
- load ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``; KV
  ``vllm:kv_cache_usage_perc`` (0..1; ``vllm:gpu_cache_usage_perc`` before v0.10);
- resume: ``token`` (exact) for streams of a model with ``replicas.tokenizers``: they go by token ids
  to ``/v1/completions`` with ``return_token_ids`` (v0.10.2+; ``gateway/tokenroute.py``); otherwise
  chat by an assistant prefix with ``continue_final_message: true`` and ``add_generation_prompt:
  false``, completions by appending the partial text to the prompt (``text``, inexact).
"""

from __future__ import annotations

from gateway.backends.base import BACKENDS, BackendTraits, ResumeMode
from gateway.backends.engine import EngineProbe


@BACKENDS.register("vllm")
class VLLMProbe(EngineProbe):
    kind = "vllm"
    traits = BackendTraits(
        resume_chat=ResumeMode.TEXT, resume_completions=ResumeMode.TEXT,
        load_signal="vllm:num_requests_running + vllm:num_requests_waiting",
        kv_signal="vllm:kv_cache_usage_perc (older: vllm:gpu_cache_usage_perc)",
        adapters=True, version_source="GET /version",
    )
    running_metrics = ("vllm:num_requests_running",)
    waiting_metrics = ("vllm:num_requests_waiting",)
    kv_metrics = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
