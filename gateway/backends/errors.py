"""Engines' error bodies, in OpenAI's form, so that the one error table in ``unbroken/errors.py``
reads them all.

- OpenAI / the project's replicas / vLLM >= 0.10: ``{"error": {"message", "type", "param", "code"}}``
  (vLLM's ``code`` is the HTTP status, an int);
- SGLang and older vLLM: the same fields flat, ``{"object": "error", "message", "type", "code"}``;
- TGI: ``{"error": "message", "error_type": "validation" | "overloaded" | "generation" | ...}``;
- llama.cpp's llama-server: ``{"error": {"code": 400, "message", "type": "exceed_context_size_error" | ...}}``.

:func:`normalize_error` also names two errors every engine words differently:
``context_length_exceeded`` (the prompt plus ``max_tokens`` does not fit; never resent unchanged)
and ``content_policy_violation`` (a refusal; never retried on the same model).
"""

from __future__ import annotations

import re
from typing import Any

_CONTEXT_RE = re.compile(r"maximum context length|context length|context window|context size|too many tokens|"
                         r"must be <= \d+|exceeds? the (?:model'?s? )?(?:max|context)", re.I)
_POLICY_CODES = {"content_policy_violation", "content_filter"}


def normalize_error(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` (an engine's error body or stream event) as ``{"error": {...}}``; a body that is
    not an error is returned unchanged."""
    err = obj.get("error")
    if isinstance(err, dict):
        e = dict(err)
    elif isinstance(err, str):  # TGI
        etype = obj.get("error_type")
        e = {"message": err, "type": str(etype) if etype else "server_error", "param": None, "code": None}
        if etype == "overloaded":
            e["code"] = "overloaded"
    elif obj.get("object") == "error" and "message" in obj:  # SGLang, older vLLM
        e = {k: obj.get(k) for k in ("message", "type", "param", "code")}
    else:
        return obj
    message = str(e.get("message") or "")[:2000]
    e["message"] = message
    code = e.get("code")
    if not isinstance(code, str):
        e["code"] = None
        code = None
    if code not in ("context_length_exceeded", *_POLICY_CODES) and (
            _CONTEXT_RE.search(message) or e.get("type") == "exceed_context_size_error"):
        e["code"] = "context_length_exceeded"
    elif code in _POLICY_CODES:
        e["code"] = "content_policy_violation"
    return {"error": e}


def is_error_event(obj: Any) -> bool:
    return isinstance(obj, dict) and ("error" in obj or obj.get("object") == "error")


def engine_error(status: int | None, obj: dict[str, Any] | None):  # type: ignore[no-untyped-def]
    """The project error for an engine's answer: ``status`` None for an error inside a stream."""
    from unbroken.errors import (ContentPolicyError, ContextLengthError, error_from_event,
                                 error_from_response)

    body = normalize_error(obj) if obj else None
    code = ((body or {}).get("error") or {}).get("code")
    if code in ("context_length_exceeded", "content_policy_violation"):
        e = body["error"]  # type: ignore[index]
        cls = ContextLengthError if code == "context_length_exceeded" else ContentPolicyError
        param = e.get("param")
        return cls(e["message"], param=param if isinstance(param, str) else None)
    if status is None:
        return error_from_event(body or {"error": {}})
    return error_from_response(status, body)
