"""OpenAI request bodies in, OpenAI response and chunk dicts out.

:func:`parse_chat_request` and :func:`parse_completion_request` validate a JSON body into an
:class:`OpenAIRequest` (wrong type or range -> :class:`~unbroken.errors.ValidationError` (422)
naming the param; a missing or unsupported param -> :class:`~unbroken.errors.InvalidRequestError`
(400)). :func:`build_generation_request` turns it, with the prompt's token ids, into the engine's
:class:`~replica.protocol.GenerationRequest`, checking the context length. The ``*_response`` and
``*_chunk`` builders produce OpenAI's JSON shapes, with the ``token_ids`` extension on every choice.

Fields OpenAI defines but this server does not use (``frequency_penalty``, ``logit_bias``, ...)
and unknown fields are ignored, as OpenAI ignores unknown fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from replica.protocol import FinishReason, GenerationRequest, SamplingParams
from unbroken.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    ValidationError,
)

MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_MISSING = object()


@dataclass
class OpenAIRequest:
    """A validated chat or completions body (only what this server acts on)."""

    kind: Literal["chat", "completion"]
    model: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat: {"role", "content": str}
    prompt_text: str | None = None  # completion with a string prompt
    prompt_token_ids: list[int] | None = None  # completion with a list of ids
    max_tokens: int | None = None  # None = whatever fits the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    resume_token_ids: list[int] = field(default_factory=list)
    echo: bool = False


# -- field validators ---------------------------------------------------------------------------


def _get(body: dict[str, Any], name: str) -> Any:
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value  # JSON null means "not given", as with OpenAI


def _int(body: dict[str, Any], name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"'{name}' must be an integer, got {_show(value)}", param=name)
    if lo is not None and value < lo:
        raise ValidationError(f"'{name}' must be at least {lo}, got {value}", param=name)
    if hi is not None and value > hi:
        raise ValidationError(f"'{name}' must be at most {hi}, got {value}", param=name)
    return value


def _float(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"'{name}' must be a number, got {_show(value)}", param=name)
    if not lo <= value <= hi:
        raise ValidationError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, bool):
        raise ValidationError(f"'{name}' must be a boolean, got {_show(value)}", param=name)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _token_ids(value: Any, name: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise ValidationError(f"'{name}' must be a list of integer token ids", param=name)
    if vocab_size is not None:
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise ValidationError(
                f"'{name}' holds token id {bad[0]}, outside this model's vocabulary [0, {vocab_size})",
                param=name)
    return list(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = _get(body, "stop")
    if value is _MISSING:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or any(not isinstance(s, str) for s in value):
        raise ValidationError("'stop' must be a string or a list of strings", param="stop")
    if len(value) > MAX_STOP_STRINGS:
        raise ValidationError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(value)}",
                              param="stop")
    return tuple(s for s in value if s)


def _model(body: dict[str, Any]) -> str:
    value = _get(body, "model")
    if value is _MISSING:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not isinstance(value, str) or not value:
        raise ValidationError("'model' must be a non-empty string", param="model")
    return value


def _common(body: dict[str, Any], kind: Literal["chat", "completion"], vocab_size: int | None) -> OpenAIRequest:
    n = _int(body, "n", lo=1)
    if n is not None and n > 1:
        raise InvalidRequestError(
            f"'n' = {n} is not supported: this server returns one choice per request (n = 1); "
            "send separate requests instead", param="n", code="unsupported_value")
    if _int(body, "best_of", lo=1) not in (None, 1):
        raise InvalidRequestError("'best_of' > 1 is not supported", param="best_of",
                                  code="unsupported_value")
    logprobs = _get(body, "logprobs")
    if logprobs is not _MISSING and logprobs is not False and logprobs != 0:
        raise InvalidRequestError("'logprobs' is not supported by this server", param="logprobs",
                                  code="unsupported_value")
    max_tokens = _int(body, "max_completion_tokens", lo=1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", lo=1)
    top_k = _int(body, "top_k", lo=-1)
    min_tokens = _int(body, "min_tokens", lo=0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValidationError(f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})",
                              param="min_tokens")
    stream = _bool(body, "stream") or False
    include_usage = False
    options = _get(body, "stream_options")
    if options is not _MISSING:
        if not isinstance(options, dict):
            raise ValidationError("'stream_options' must be an object", param="stream_options")
        flag = options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise ValidationError("'stream_options.include_usage' must be a boolean",
                                  param="stream_options.include_usage")
        include_usage = bool(flag)
    user = _get(body, "user")
    if user is not _MISSING and not isinstance(user, str):
        raise ValidationError("'user' must be a string", param="user")
    resume = _get(body, "resume_token_ids")
    temperature = _float(body, "temperature", 0.0, 2.0)
    top_p = _float(body, "top_p", 0.0, 1.0)
    return OpenAIRequest(
        kind=kind,
        model=_model(body),
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None or top_k == -1 else top_k,
        min_tokens=min_tokens,
        ignore_eos=_bool(body, "ignore_eos") or False,
        seed=_int(body, "seed", lo=-(2**63), hi=2**64 - 1),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage and stream,
        user=None if user is _MISSING else user,
        resume_token_ids=[] if resume is _MISSING else _token_ids(resume, "resume_token_ids", vocab_size),
    )


def _message_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValidationError(
                    f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                    "are supported", param=f"messages[{index}].content")
        return "".join(parts)
    raise ValidationError(f"messages[{index}].content must be a string or a list of text parts",
                          param=f"messages[{index}].content")


def parse_chat_request(body: dict[str, Any], vocab_size: int | None = None, *,
                       allow_empty_messages: bool = False) -> OpenAIRequest:
    """Validate a ``/v1/chat/completions`` body. ``allow_empty_messages``: the conversation is
    kept by the server (``X-Session-History: server``), so no new message is needed."""
    req = _common(body, "chat", vocab_size)
    messages = _get(body, "messages")
    if messages is _MISSING:
        raise InvalidRequestError("you must provide a 'messages' parameter", param="messages")
    if not isinstance(messages, list):
        raise ValidationError("'messages' must be a list of message objects", param="messages")
    if not messages and not allow_empty_messages:
        raise InvalidRequestError("'messages' must hold at least one message", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValidationError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ValidationError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {_show(role)}",
                                  param=f"messages[{i}].role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        req.messages.append({"role": role, "content": _message_content(content, i)})
    return req


def parse_completion_request(body: dict[str, Any], vocab_size: int | None = None) -> OpenAIRequest:
    """Validate a ``/v1/completions`` body: ``prompt`` is a string or a list of token ids (a
    one-element list of either is accepted too; several prompts are not supported)."""
    req = _common(body, "completion", vocab_size)
    prompt = _get(body, "prompt")
    if prompt is _MISSING:
        raise InvalidRequestError("you must provide a 'prompt' parameter", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequestError("several prompts in one request are not supported; send one prompt "
                                  "per request", param="prompt", code="unsupported_value")
    else:
        req.prompt_token_ids = _token_ids(prompt, "prompt", vocab_size)
    if (req.prompt_text == "") or (req.prompt_token_ids is not None and not req.prompt_token_ids):
        raise InvalidRequestError("the prompt is empty", param="prompt")
    echo = _bool(body, "echo")
    if echo:
        raise InvalidRequestError("'echo' is not supported by this server", param="echo",
                                  code="unsupported_value")
    return req


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
