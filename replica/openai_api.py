"""OpenAI request bodies in, OpenAI response and chunk dicts out.

:func:`parse_chat_request` and :func:`parse_completion_request` validate a JSON body into the
contract's :class:`~unbroken.contract.openai.OpenAIRequest` (the same parser the gateway uses: wrong
type or range -> :class:`~unbroken.errors.ValidationError` (422) naming the param; a missing or
unsupported param -> :class:`~unbroken.errors.InvalidRequestError` (400)), bounding token ids by
this model's vocabulary. :func:`build_generation_request` turns it, with the prompt's token ids,
into the engine's :class:`~replica.protocol.GenerationRequest`, checking the context length. The
``*_response`` and ``*_chunk`` builders produce OpenAI's JSON shapes, with the ``token_ids``
extension on every choice.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from replica.protocol import FinishReason, GenerationRequest, SamplingParams
from unbroken.contract.openai import OpenAIRequest, parse_body
from unbroken.errors import ContextLengthError, ModelNotFoundError


def parse_chat_request(body: dict[str, Any], vocab_size: int | None = None, *,
                       allow_empty_messages: bool = False) -> OpenAIRequest:
    """Validate a ``/v1/chat/completions`` body. ``allow_empty_messages``: the conversation is
    kept by the server (``X-Session-History: server``), so no new message is needed."""
    return parse_body("chat", body, vocab_size=vocab_size, allow_empty_messages=allow_empty_messages)


def parse_completion_request(body: dict[str, Any], vocab_size: int | None = None) -> OpenAIRequest:
    """Validate a ``/v1/completions`` body: ``prompt`` is a string or a list of token ids (a
    one-element list of either is accepted too; several prompts are not supported)."""
    return parse_body("completion", body, vocab_size=vocab_size)


def resolve_adapter(model: str, served_name: str, adapter_names: list[str]) -> str | None:
    """``served_name`` -> None (the base model); ``served_name:ADAPTER`` -> ADAPTER."""
    if model == served_name:
        return None
    base, sep, adapter = model.partition(":")
    if sep and base == served_name and adapter in adapter_names:
        return adapter
    names = [served_name] + [f"{served_name}:{a}" for a in adapter_names]
    raise ModelNotFoundError(f"the model '{model}' does not exist here; available: {', '.join(names)}",
                             param="model")


def build_generation_request(
    req: OpenAIRequest,
    prompt_token_ids: list[int],
    *,
    request_id: str,
    adapter: str | None,
    max_model_len: int,
    session_id: str | None = None,
    arrival_s: float = 0.0,
) -> GenerationRequest:
    """The engine's request; raises :class:`ContextLengthError` when prompt + resume tokens +
    ``max_tokens`` cannot fit ``max_model_len`` (``max_tokens`` counts the resume tokens)."""
    num_prompt = len(prompt_token_ids)
    num_resume = len(req.resume_token_ids)
    param = "messages" if req.kind == "chat" else "prompt"
    if num_prompt + max(num_resume, 1) > max_model_len:
        raise ContextLengthError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt} tokens" + (f" plus {num_resume} resumed tokens" if num_resume else "")
            + ", which leaves no room to generate", param=param)
    if req.max_tokens is None:
        max_tokens = max_model_len - num_prompt
    else:
        max_tokens = req.max_tokens
        if num_prompt + max_tokens > max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {max_model_len} tokens; you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the "
                "completion); reduce the prompt or max_tokens", param=param)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_tokens=min(req.min_tokens, max_tokens),
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        stop=req.stop,
    )
    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling=sampling,
        adapter=adapter,
        session_id=session_id,
        resume_token_ids=list(req.resume_token_ids),
        arrival_s=arrival_s,
    )


# -- responses -----------------------------------------------------------------------------------


def finish_reason_str(reason: FinishReason | str | None) -> str | None:
    """OpenAI's finish_reason: ``stop`` or ``length`` (a cancelled request ends as ``stop``)."""
    if reason is None:
        return None
    value = reason.value if isinstance(reason, FinishReason) else str(reason)
    return "length" if value == "length" else "stop"


def usage_dict(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def chat_completion_response(
    *, response_id: str, model: str, created: int, text: str, token_ids: list[int],
    finish_reason: str | None, usage: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }],
        "usage": usage,
    }


def completion_response(
    *, response_id: str, model: str, created: int, text: str, token_ids: list[int],
    finish_reason: str | None, usage: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }],
        "usage": usage,
    }


def chat_chunk(
    *, response_id: str, model: str, created: int, delta: dict[str, Any], token_ids: list[int],
    finish_reason: str | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(
    *, response_id: str, model: str, created: int, text: str, token_ids: list[int],
    finish_reason: str | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(*, kind: Literal["chat", "completion"], response_id: str, model: str, created: int,
                usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
    return {
        "id": response_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def models_response(served_name: str, adapter_names: list[str], created: int | None = None) -> dict[str, Any]:
    """``GET /v1/models``: the base model and one entry per adapter."""
    created = int(time.time()) if created is None else created
    data = [{"id": served_name, "object": "model", "created": created, "owned_by": "unbroken",
             "root": served_name, "parent": None}]
    for a in adapter_names:
        data.append({"id": f"{served_name}:{a}", "object": "model", "created": created,
                     "owned_by": "unbroken", "root": served_name, "parent": served_name})
    return {"object": "list", "data": data}


__all__ = [
    "OpenAIRequest",
    "build_generation_request",
    "chat_chunk",
    "chat_completion_response",
    "completion_chunk",
    "completion_response",
    "finish_reason_str",
    "models_response",
    "parse_chat_request",
    "parse_completion_request",
    "resolve_adapter",
    "usage_chunk",
    "usage_dict",
]
