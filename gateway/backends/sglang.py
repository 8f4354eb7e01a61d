"""SGLang's server (followed: SGLang docs "Production Metrics" and the OpenAI API pages, v0.5).

- detected by ``GET /get_server_info`` (a JSON object with ``version``) or ``GET /get_model_info``
  (``model_path``);
- health ``GET /health``; models ``GET /v1/models``;
- load ``sglang:num_running_reqs`` / ``sglang:num_queue_reqs``; KV ``sglang:token_usage`` (0..1)
  — served when the server runs with ``--enable-metrics``; without it, routing uses in-flight only;
- resume: ``token`` (exact) for streams of a model with ``replicas.tokenizers``: they go by token ids
  to ``/generate`` with ``input_ids`` (v0.5.2; ``gateway/tokenroute.py``); otherwise chat by an
  assistant prefix with ``continue_final_message: true``, completions by prompt (``text``, inexact).
"""

from __future__ import annotations

from gateway.backends.base import BACKENDS, BackendTraits, ResumeMode
from gateway.backends.engine import EngineProbe


@BACKENDS.register("sglang")
class SGLangProbe(EngineProbe):
    kind = "sglang"
    traits = BackendTraits(
        resume_chat=ResumeMode.TEXT, resume_completions=ResumeMode.TEXT,
        load_signal="sglang:num_running_reqs + sglang:num_queue_reqs",
        kv_signal="sglang:token_usage", adapters=True, version_source="GET /get_server_info",
    )
    running_metrics = ("sglang:num_running_reqs",)
    waiting_metrics = ("sglang:num_queue_reqs",)
    kv_metrics = ("sglang:token_usage",)
