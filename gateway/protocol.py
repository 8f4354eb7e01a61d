"""Client request bodies, checked at the gateway: a client's mistake is answered here (OpenAI
error JSON, 4xx) and never forwarded. :func:`parse_request` returns a :class:`ClientRequest`,
the typed form the rest of the gateway works with; the body itself is forwarded as sent (plus
``resume_token_ids`` on a failover, a fallback ``model``, or a clamped ``max_tokens``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unbroken.errors import InvalidRequestError, ValidationError

PRIORITIES = ("critical", "normal", "batch")
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


@dataclass
class ClientRequest:
    route: str
    body: dict[str, Any]
    model: str
    stream: bool
    n: int
    max_tokens: int | None
    priority: str
    session_key: str | None
    num_prompt_chars: int
    transferable: bool  # whether a stream's state can move to another replica mid-stream

    @property
    def base_model(self) -> str:
        return self.model.partition(":")[0]

    @property
    def adapter(self) -> str | None:
        base, sep, adapter = self.model.partition(":")
        return adapter if sep and adapter else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise ValidationError(f"'{name}' must be an integer, got {type(v).__name__}", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValidationError(f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}", param=name)
    return int(v)


def _check_number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_number(v):
        raise ValidationError(f"'{name}' must be a number, got {type(v).__name__}", param=name)
    if not lo <= v <= hi:
        raise ValidationError(f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)


def _check_bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValidationError(f"'{name}' must be a boolean, got {type(v).__name__}", param=name)
    return v


def _content_chars(content: Any, idx: int) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValidationError(f"messages[{idx}].content parts must be objects with a 'type'",
                                      param=f"messages[{idx}].content")
            text = part.get("text")
            if isinstance(text, str):
                total += len(text)
        return total
    raise ValidationError(f"messages[{idx}].content must be a string, a list of parts or null",
                          param=f"messages[{idx}].content")


def parse_request(route: str, body: dict[str, Any], headers: Any, default_model: str | None) -> ClientRequest:
    """Check ``body`` for ``route``; raise 400/422 errors that name the offending field."""
    model = body.get("model", default_model)
    if model is None:
        raise InvalidRequestError("'model' is required", param="model")
    if not isinstance(model, str) or not model:
        raise ValidationError("'model' must be a non-empty string", param="model")
    if "resume_token_ids" in body:
        raise InvalidRequestError("'resume_token_ids' is set by the gateway, not by clients",
                                  param="resume_token_ids")
    num_chars = 0
    num_prompts = 1
    if route == CHAT_ROUTE:
        messages = body.get("messages")
        if messages is None:
            raise InvalidRequestError("'messages' is required", param="messages")
        if not isinstance(messages, list):
            raise ValidationError("'messages' must be a list", param="messages")
        if not messages and headers.get("X-Session-History", "").lower() != "server":
            raise InvalidRequestError("'messages' must not be empty", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValidationError(f"messages[{i}] must be an object", param=f"messages[{i}]")
            role = m.get("role")
            if not isinstance(role, str) or role not in ("system", "user", "assistant", "tool", "developer"):
                raise ValidationError(f"messages[{i}].role must be one of system, user, assistant, tool, developer",
                                      param=f"messages[{i}].role")
            num_chars += _content_chars(m.get("content"), i)
        max_tokens = _check_int(body, "max_completion_tokens", 1)
        mt = _check_int(body, "max_tokens", 1)
        max_tokens = mt if mt is not None else max_tokens
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise InvalidRequestError("'prompt' is required", param="prompt")
        if isinstance(prompt, str):
            num_chars = len(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            num_chars = len(prompt) * 3
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            num_chars = sum(len(p) for p in prompt)
            num_prompts = len(prompt)
        else:
            raise ValidationError("'prompt' must be a string, a list of strings or a list of token ids",
                                  param="prompt")
        max_tokens = _check_int(body, "max_tokens", 1)
    n = _check_int(body, "n", 1, 16) or 1
    _check_int(body, "min_tokens", 0)
    _check_int(body, "seed")
    _check_int(body, "top_k", -1)
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_number(body, "presence_penalty", -2.0, 2.0)
    _check_number(body, "frequency_penalty", -2.0, 2.0)
    _check_bool(body, "ignore_eos")
    stream = _check_bool(body, "stream")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ValidationError("'stop' must be a string or a list of strings", param="stop")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ValidationError("'stream_options' must be an object", param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ValidationError("'user' must be a string", param="user")
    priority = (headers.get("X-Priority") or "normal").lower()
    if priority not in PRIORITIES:
        raise InvalidRequestError(f"X-Priority must be one of {', '.join(PRIORITIES)}, got {priority!r}",
                                  param="X-Priority")
    session_key = headers.get("X-Session-ID") or user or None
    return ClientRequest(
        route=route, body=body, model=model, stream=stream, n=n, max_tokens=max_tokens, priority=priority,
        session_key=session_key, num_prompt_chars=num_chars,
        transferable=(n == 1 and num_prompts == 1 and not body.get("logprobs") and not body.get("echo")),
    )
