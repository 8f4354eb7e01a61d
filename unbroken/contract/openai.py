"""The one typed OpenAI request, parsed once at each end.

The gateway parses a client's body with :func:`parse_body` into an :class:`OpenAIRequest`, changes
that value (a degradation clamp, a fallback model, ``resume_token_ids`` on a failover) and sends
:meth:`OpenAIRequest.to_body`; the replica parses what it receives with the same function. So both
ends read a body by the same rules:

- ``max_completion_tokens`` wins over the deprecated ``max_tokens`` (OpenAI's rule); the parsed
  value is ``max_tokens`` (None = whatever fits the context);
- a wrong type or range is a 422 :class:`~unbroken.errors.ValidationError` naming the field;
- a missing field, or a field this project does not implement, is a 400
  :class:`~unbroken.errors.InvalidRequestError` naming the field (``param``): see
  :data:`UNSUPPORTED` — refused here, in one place, never passed on or ignored. ``n`` > 1, several
  prompts, ``logprobs`` and ``echo`` are refused the same way at both ends;
- fields this project neither uses nor refuses (``metadata``, ``store``, unknown names) are dropped.

``vocab_size`` (known only to the replica) bounds token ids in ``prompt`` and ``resume_token_ids``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict

from unbroken.errors import InvalidRequestError, ValidationError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
_MISSING = object()


class OpenAIRequest(BaseModel):
    """A validated chat or completions body: exactly what this project acts on."""

    model_config = ConfigDict(frozen=False, extra="forbid")

    kind: Literal["chat", "completion"]
    model: str
    messages: list[dict[str, str]] = []  # chat: {"role", "content": text}
    prompt_text: str | None = None  # completion with a string prompt
    prompt_token_ids: list[int] | None = None  # completion with a list of ids
    max_tokens: int | None = None  # after precedence; None = whatever fits the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering (vLLM's -1 is read as 0)
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # only with stream
    user: str | None = None
    resume_token_ids: list[int] = []  # set by the gateway on a failover, never by a client

    @property
    def num_prompt_chars(self) -> int:
        if self.kind == "chat":
            return sum(len(m["content"]) for m in self.messages)
        if self.prompt_text is not None:
            return len(self.prompt_text)
        return 3 * len(self.prompt_token_ids or ())

    def to_body(self) -> dict[str, Any]:
        """The JSON body that :func:`parse_body` reads back as this same value."""
        body: dict[str, Any] = {"model": self.model}
        if self.kind == "chat":
            body["messages"] = self.messages
            if self.max_tokens is not None:
                body["max_completion_tokens"] = self.max_tokens
        else:
            body["prompt"] = self.prompt_text if self.prompt_text is not None else self.prompt_token_ids
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
        body.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stream=self.stream)
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.user is not None:
            body["user"] = self.user
        if self.resume_token_ids:
            body["resume_token_ids"] = self.resume_token_ids
        return body


def _neutral_empty(v: Any) -> bool:
    return v in ({}, [], "")


def _neutral_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# Fields OpenAI defines that this project does not implement, with the values that mean "not
# used" (accepted, as the OpenAI SDK and many clients send them). Any other value is refused.
UNSUPPORTED: dict[str, Any] = {
    "logit_bias": _neutral_empty,
    "tools": _neutral_empty,
    "functions": _neutral_empty,
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "presence_penalty": _neutral_zero,
    "frequency_penalty": _neutral_zero,
    "repetition_penalty": lambda v: v == 1 and not isinstance(v, bool),
    "logprobs": lambda v: v is False or _neutral_zero(v),
    "top_logprobs": _neutral_zero,
    "echo": lambda v: v is False,
    "suffix": _neutral_empty,
    "audio": _neutral_empty,
    "modalities": lambda v: v == ["text"],
    "prediction": _neutral_empty,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
}


# -- field readers --------------------------------------------------------------------------------


def _get(body: Mapping[str, Any], name: str) -> Any:
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value  # JSON null means "not given", as with OpenAI


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: Mapping[str, Any], name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
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


def _float(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"'{name}' must be a number, got {_show(value)}", param=name)
    if not lo <= value <= hi:
        raise ValidationError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, bool):
        raise ValidationError(f"'{name}' must be a boolean, got {_show(value)}", param=name)
    return value


def _token_ids(value: Any, name: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise ValidationError(f"'{name}' must be a list of integer token ids", param=name)
    lo, hi = 0, vocab_size if vocab_size is not None else 2**31
    bad = [t for t in value if not lo <= t < hi]
    if bad:
        where = f"this model's vocabulary [0, {vocab_size})" if vocab_size is not None else "[0, 2**31)"
        raise ValidationError(f"'{name}' holds token id {bad[0]}, outside {where}", param=name)
    return list(value)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
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


def _model(body: Mapping[str, Any]) -> str:
    value = _get(body, "model")
    if value is _MISSING:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not isinstance(value, str) or not value:
        raise ValidationError("'model' must be a non-empty string", param="model")
    return value


def refuse_unsupported(body: Mapping[str, Any]) -> None:
    """The one place where fields this project does not implement are refused (400, ``param`` =
    the field). ``n`` must be 1, ``top_logprobs`` an integer in [0, 20]."""
    n = _int(body, "n", lo=1)
    if n is not None and n > 1:
        raise InvalidRequestError(
            f"'n' = {n} is not supported: this server returns one choice per request (n = 1); "
            "send separate requests instead", param="n", code="unsupported_value")
    _int(body, "top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
    for name, is_neutral in UNSUPPORTED.items():
        value = _get(body, name)
        if value is not _MISSING and not is_neutral(value):
            raise InvalidRequestError(f"'{name}' is not supported by this server (got {_show(value)})",
                                      param=name, code="unsupported_value")


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


def _messages(body: Mapping[str, Any], allow_empty: bool) -> list[dict[str, str]]:
    messages = _get(body, "messages")
    if messages is _MISSING:
        raise InvalidRequestError("you must provide a 'messages' parameter", param="messages")
    if not isinstance(messages, list):
        raise ValidationError("'messages' must be a list of message objects", param="messages")
    if not messages and not allow_empty:
        raise InvalidRequestError("'messages' must hold at least one message", param="messages")
    out = []
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
        out.append({"role": role, "content": _message_content(content, i)})
    return out


def _prompt(body: Mapping[str, Any], vocab_size: int | None) -> tuple[str | None, list[int] | None]:
    prompt = _get(body, "prompt")
    if prompt is _MISSING:
        raise InvalidRequestError("you must provide a 'prompt' parameter", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequestError("several prompts in one request are not supported; send one prompt "
                                  "per request", param="prompt", code="unsupported_value")
    ids = _token_ids(prompt, "prompt", vocab_size)
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    return None, ids


def parse_body(kind: Literal["chat", "completion"], body: Mapping[str, Any], *, vocab_size: int | None = None,
               allow_empty_messages: bool = False, default_model: str | None = None) -> OpenAIRequest:
    """Validate a ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions`` body.
    ``allow_empty_messages``: the conversation is kept by the server (``X-Session-History:
    server``). ``default_model`` stands in for a missing ``model``."""
    if default_model is not None and _get(body, "model") is _MISSING:
        body = {**body, "model": default_model}
    model = _model(body)
    refuse_unsupported(body)
    # OpenAI's precedence: max_completion_tokens (chat) wins over the deprecated max_tokens.
    max_completion = _int(body, "max_completion_tokens", lo=1) if kind == "chat" else None
    max_legacy = _int(body, "max_tokens", lo=1)
    max_tokens = max_completion if max_completion is not None else max_legacy
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
    messages: list[dict[str, str]] = []
    prompt_text = prompt_ids = None
    if kind == "chat":
        messages = _messages(body, allow_empty_messages)
    else:
        prompt_text, prompt_ids = _prompt(body, vocab_size)
    return OpenAIRequest(
        kind=kind,
        model=model,
        messages=messages,
        prompt_text=prompt_text,
        prompt_token_ids=prompt_ids,
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
