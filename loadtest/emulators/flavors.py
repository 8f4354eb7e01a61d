"""What differs between the emulated engines, one class each.

Followed (names and shapes checked against each project's documentation):
- vLLM v0.11 (docs.vllm.ai "OpenAI-Compatible Server" and "Production Metrics"): ``/health`` (200,
  empty), ``/version``, ``/v1/models`` (``owned_by: "vllm"``, ``max_model_len``), errors
  ``{"error": {"message", "type": "BadRequestError", "param", "code": 400}}``, metrics
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``,
  chat prefixes with ``continue_final_message``;
- SGLang v0.5 (docs.sglang.io "Production Metrics", OpenAI API): ``/health``, ``/get_server_info``,
  ``/get_model_info``, flat errors ``{"object": "error", "message", "type", "param", "code"}``,
  metrics ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``,
  ``continue_final_message`` accepted;
- TGI v3.3 (huggingface.co/docs/text-generation-inference "Metrics", Messages API): ``/health``,
  ``/info``, ``/v1/models``, errors ``{"error": "...", "error_type": "validation" | "overloaded" |
  "generation"}`` (422 for validation), metrics ``tgi_queue_size``, ``tgi_batch_current_size``,
  no assistant prefix (refused with 422 here).
- llama.cpp's llama-server (tools/server/README.md, 2025): ``/health`` (``{"status": "ok"}``), ``/props``,
  ``/slots``, errors ``{"error": {"code", "message", "type"}}`` (``exceed_context_size_error``), metrics
  ``llamacpp:requests_processing``, ``llamacpp:requests_deferred``, ``llamacpp:kv_cache_usage_ratio``.
All of them stream ``data: {json}\\n\\n`` chunks (``chat.completion.chunk`` / ``text_completion``), a
final chunk with ``finish_reason``, an optional usage chunk (``stream_options.include_usage``) and
``data: [DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from loadtest.emulators.base import EmulatorKnobs, EngineEmulator


class Flavor:
    kind = ""
    version = ""
    accepts_prefix = True
    info_routes: dict[str, Any] = {}
    system_fingerprint: str | None = None
    generate_route = ""  # an engine's own generation route besides the OpenAI ones

    # -- token-id requests (EngineEmulator.token_model) --------------------------------------------

    def token_request(self, path: str, body: dict[str, Any]) -> tuple[Any, int] | None:
        """``(prompt ids, max new tokens)`` when ``body`` asks by token ids, else None."""
        return None

    def token_events(self, e: EngineEmulator, body: dict[str, Any], rid: str, created: int, ids: list[int],
                     gen: list[int], max_new: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def token_closing(self, e: EngineEmulator, body: dict[str, Any], rid: str, created: int, ids: list[int],
                      gen: list[int]) -> list[dict[str, Any]]:
        return []

    # -- errors ----------------------------------------------------------------------------------

    def error_body(self, status: int, message: str, kind: str) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=orjson.dumps(self.error_body(status, message, kind)), status=status,
                            content_type="application/json", headers=headers)

    def context_error(self, max_len: int, num_prompt: int, max_tokens: int) -> web.Response:
        raise NotImplementedError

    def content_refusal(self) -> web.Response:
        # What a moderated deployment answers (OpenAI's code), the same behind any engine.
        return web.Response(body=orjson.dumps({"error": {
            "message": "The request was refused by the content policy: it asks for disallowed content.",
            "type": "invalid_request_error", "param": "messages", "code": "content_policy_violation"}}),
            status=400, content_type="application/json")

    # -- bodies ----------------------------------------------------------------------------------

    def models_body(self, e: EngineEmulator) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": e.model, "object": "model", "created": int(time.time()),
                                            "owned_by": self.kind}]}

    def health_response(self, e: EngineEmulator) -> web.Response:
        return web.Response(status=200)

    def metrics_text(self, e: EngineEmulator, running: int, waiting: int, kv: float) -> str:
        raise NotImplementedError

    def chunk(self, e: EngineEmulator, chat: bool, rid: str, created: int, delta: Any,
              finish: str | None) -> dict[str, Any]:
        if chat:
            ch: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": e.model, "choices": [ch]}
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        return out

    def usage_chunk(self, e: EngineEmulator, chat: bool, rid: str, created: int, num_prompt: int,
                    num_completion: int) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": e.model, "choices": [],
                "usage": {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
                          "total_tokens": num_prompt + num_completion}}

    def completion_body(self, e: EngineEmulator, chat: bool, rid: str, text: str, num_prompt: int,
                        num_completion: int) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": e.model, "choices": [choice],
                "usage": {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
                          "total_tokens": num_prompt + num_completion}}


class VLLMFlavor(Flavor):
    kind = "vllm"
    version = "0.11.0"
    info_routes = {"/version": lambda e: {"version": VLLMFlavor.version}}
    _types = {400: "BadRequestError", 404: "NotFoundError", 429: "TooManyRequestsError",
              500: "InternalServerError", 503: "ServiceUnavailableError"}

    def error_body(self, status: int, message: str, kind: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": self._types.get(status, "BadRequestError"), "param": None,
                          "code": status}}

    def context_error(self, max_len: int, num_prompt: int, max_tokens: int) -> web.Response:
        return self.error(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                               f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in "
                               f"the completion). Please reduce the length of the messages or completion.",
                          "validation")

    def token_request(self, path: str, body: dict[str, Any]) -> tuple[Any, int] | None:
        # vLLM v0.11 CompletionRequest: ``prompt`` may be a list of ids; ``return_token_ids`` (v0.10.2+)
        if path != "/v1/completions" or not isinstance(body.get("prompt"), list):
            return None
        return body["prompt"], int(body.get("max_tokens") or 16)

    def token_events(self, e: EngineEmulator, body: dict[str, Any], rid: str, created: int, ids: list[int],
                     gen: list[int], max_new: int) -> list[dict[str, Any]]:
        """One ``text_completion`` chunk per token (serving_completion.py, v0.11): with
        ``return_token_ids`` the choice carries ``token_ids`` (and the first one ``prompt_token_ids``);
        the finish reason comes with the last token."""
        want_ids = bool(body.get("return_token_ids"))
        finish = "length" if len(gen) >= max_new else "stop"
        out = []
        for i, t in enumerate(gen):
            last = i == len(gen) - 1
            ch: dict[str, Any] = {"index": 0, "text": e.token_model.decode(gen[:i + 1])[len(e.token_model.decode(
                gen[:i])):], "logprobs": None, "finish_reason": finish if last else None,
                                  "stop_reason": None}
            if want_ids:
                ch["prompt_token_ids"] = ids if i == 0 else None
                ch["token_ids"] = [t]
            out.append({"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": e.model,
                        "choices": [ch]})
        return out

    def token_closing(self, e: EngineEmulator, body: dict[str, Any], rid: str, created: int, ids: list[int],
                      gen: list[int]) -> list[dict[str, Any]]:
        so = body.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            return [self.usage_chunk(e, False, f"cmpl-{rid}", created, len(ids), len(gen))]
        return []

    def models_body(self, e: EngineEmulator) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": e.model, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": e.model,
            "parent": None, "max_model_len": e.knobs.max_model_len,
            "permission": [{"id": "modelperm-0", "object": "model_permission", "allow_sampling": True}]}]}

    def metrics_text(self, e: EngineEmulator, running: int, waiting: int, kv: float) -> str:
        lbl = f'{{engine="0",model_name="{e.model}"}}'
        return (f"# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{lbl} {float(running)}\n"
                f"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{lbl} {float(waiting)}\n"
                f"# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{lbl} {kv}\n")


class SGLangFlavor(Flavor):
    kind = "sglang"
    version = "0.5.2"
    generate_route = "/generate"

    def __init__(self, stream_output: bool = False) -> None:
        self.stream_output = stream_output  # the server's --stream-output: output_ids only the new ones

    def token_request(self, path: str, body: dict[str, Any]) -> tuple[Any, int] | None:
        # SGLang v0.5.2 GenerateReqInput: ``input_ids``, ``sampling_params.max_new_tokens`` (default 128)
        if path != "/generate":
            return None
        params = body.get("sampling_params") or {}
        return body.get("input_ids"), int(params.get("max_new_tokens") or 128)

    def token_events(self, e: EngineEmulator, body: dict[str, Any], rid: str, created: int, ids: list[int],
                     gen: list[int], max_new: int) -> list[dict[str, Any]]:
        """One event per token (tokenizer_manager.py, v0.5.2): ``text`` so far, ``output_ids`` (all so
        far; the new ones with ``--stream-output``) and ``meta_info`` (``finish_reason`` with the last)."""
        out = []
        for i in range(len(gen)):
            last = i == len(gen) - 1
            finish = None
            if last:
                finish = {"type": "length", "length": max_new} if len(gen) >= max_new else \
                    {"type": "stop", "matched": gen[-1]}
            out.append({"text": e.token_model.decode(gen[:i + 1]),
                        "output_ids": gen[i:i + 1] if self.stream_output else gen[:i + 1],
                        "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
                                      "completion_tokens": i + 1, "cached_tokens": 0}})
        return out
    info_routes = {
        "/get_server_info": lambda e: {"version": SGLangFlavor.version, "model_path": e.model,
                                       "tokenizer_path": e.model, "context_length": e.knobs.max_model_len},
        "/get_model_info": lambda e: {"model_path": e.model, "tokenizer_path": e.model, "is_generation": True},
    }

    def error_body(self, status: int, message: str, kind: str) -> dict[str, Any]:
        return {"object": "error", "message": message,
                "type": "BadRequestError" if status < 500 else "InternalServerError", "param": None, "code": status}

    def context_error(self, max_len: int, num_prompt: int, max_tokens: int) -> web.Response:
        return self.error(400, f"Requested token count exceeds the model's maximum context length of {max_len} "
                               f"tokens. You requested a total of {num_prompt + max_tokens} tokens: {num_prompt} "
                               f"tokens from the input messages and {max_tokens} tokens for the completion.",
                          "validation")

    def models_body(self, e: EngineEmulator) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": e.model, "object": "model", "created": int(time.time()),
                                            "owned_by": "sglang", "root": e.model,
                                            "max_model_len": e.knobs.max_model_len}]}

    def metrics_text(self, e: EngineEmulator, running: int, waiting: int, kv: float) -> str:
        lbl = f'{{engine_type="unified",model_name="{e.model}",pp_rank="0",tp_rank="0"}}'
        return (f"# HELP sglang:num_running_reqs The number of running requests.\n"
                f"# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{lbl} {float(running)}\n"
                f"# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n"
                f"# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{lbl} {float(waiting)}\n"
                f"# HELP sglang:token_usage The token usage.\n"
                f"# TYPE sglang:token_usage gauge\nsglang:token_usage{lbl} {kv}\n")


class TGIFlavor(Flavor):
    kind = "tgi"
    version = "3.3.4"
    accepts_prefix = False
    system_fingerprint = "3.3.4-native"
    info_routes = {"/info": lambda e: {
        "model_id": e.model, "model_sha": None, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
        "max_input_tokens": e.knobs.max_model_len - 1, "max_total_tokens": e.knobs.max_model_len,
        "validation_workers": 2, "max_client_batch_size": 4, "router": "text-generation-router",
        "version": TGIFlavor.version, "sha": None, "docker_label": None}}
    _error_types = {"validation": "validation", "overloaded": "overloaded", "internal": "generation",
                    "not_found": "validation"}

    def error_body(self, status: int, message: str, kind: str) -> dict[str, Any]:
        return {"error": message, "error_type": self._error_types.get(kind, "generation")}

    def error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
        if kind == "validation":
            status = 422  # TGI answers validation errors with 422
        return super().error(status, message, kind, headers)

    def context_error(self, max_len: int, num_prompt: int, max_tokens: int) -> web.Response:
        return self.error(422, f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {max_len}. "
                               f"Given: {num_prompt} `inputs` tokens and {max_tokens} `max_new_tokens`",
                          "validation")

    def models_body(self, e: EngineEmulator) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": e.model, "object": "model", "created": 0, "owned_by": e.model}]}

    def metrics_text(self, e: EngineEmulator, running: int, waiting: int, kv: float) -> str:
        return (f"# TYPE tgi_queue_size gauge\ntgi_queue_size {float(waiting)}\n"
                f"# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size {float(running)}\n"
                f"# TYPE tgi_batch_current_max_tokens gauge\ntgi_batch_current_max_tokens 0\n")


class LlamaServerFlavor(Flavor):
    """llama.cpp's ``llama-server`` (followed: tools/server/README.md, 2025), started with ``--metrics``."""

    kind = "llamacpp"
    version = "b6000"
    accepts_prefix = False  # the gateway resumes llama.cpp chat streams "none" (llama-cpp-python cannot)
    info_routes = {
        "/props": lambda e: {"default_generation_settings": {"n_ctx": e.knobs.max_model_len, "params": {}},
                             "total_slots": 2, "model_path": f"/models/{e.model}.gguf",
                             "chat_template": "", "build_info": LlamaServerFlavor.version},
        "/slots": lambda e: [{"id": i, "n_ctx": e.knobs.max_model_len, "is_processing": i < e.num_running}
                             for i in range(2)],
    }
    _types = {400: "invalid_request_error", 404: "not_found_error", 500: "server_error", 503: "unavailable_error"}

    def error_body(self, status: int, message: str, kind: str) -> dict[str, Any]:
        return {"error": {"code": status, "message": message, "type": self._types.get(status, "server_error")}}

    def context_error(self, max_len: int, num_prompt: int, max_tokens: int) -> web.Response:
        body = {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing "
                                                  "it", "type": "exceed_context_size_error",
                          "n_prompt_tokens": num_prompt, "n_ctx": max_len}}
        return web.Response(body=orjson.dumps(body), status=400, content_type="application/json")

    def models_body(self, e: EngineEmulator) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": e.model, "object": "model", "created": int(time.time()),
                                            "owned_by": "llamacpp", "meta": {"n_ctx_train": e.knobs.max_model_len}}]}

    def health_response(self, e: EngineEmulator) -> web.Response:
        return web.json_response({"status": "ok"})

    def metrics_text(self, e: EngineEmulator, running: int, waiting: int, kv: float) -> str:
        return (f"# HELP llamacpp:requests_processing Number of requests processing.\n"
                f"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {running}\n"
                f"# HELP llamacpp:requests_deferred Number of requests deferred.\n"
                f"# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred {waiting}\n"
                f"# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.\n"
                f"# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio {kv}\n")


FLAVORS: dict[str, type[Flavor]] = {"vllm": VLLMFlavor, "sglang": SGLangFlavor, "tgi": TGIFlavor,
                                    "llamacpp": LlamaServerFlavor}


def make_emulator(kind: str, knobs: EmulatorKnobs | None = None, *, model: str = "qwen",
                  name: str = "", token_model: Any = None) -> EngineEmulator:
    """An emulator of ``kind``; an unknown kind lists the supported ones. ``token_model``
    (:mod:`loadtest.emulators.tokens`) answers token-id requests."""
    try:
        flavor = FLAVORS[kind]()
    except KeyError:
        raise ValueError(f"unknown engine {kind!r}; supported: {', '.join(sorted(FLAVORS))}") from None
    return EngineEmulator(flavor, knobs, model=model, name=name, token_model=token_model)
