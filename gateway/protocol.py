"""Client requests at the gateway: parsed once, with the contract's parser, into a
:class:`ClientRequest`. A client's mistake is answered here (OpenAI error JSON, 4xx) and never
forwarded. The gateway changes the parsed :class:`~unbroken.contract.openai.OpenAIRequest` (a
fallback ``model``, a clamped ``max_tokens``, ``resume_token_ids`` on a failover) and sends its
serialization (:meth:`ClientRequest.payload`); there is no raw body to keep in step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from unbroken.contract import headers as hdr
from unbroken.contract.openai import CHAT_ROUTE, COMPLETIONS_ROUTE, OpenAIRequest, parse_body
from unbroken.errors import InvalidRequestError

__all__ = ["CHAT_ROUTE", "COMPLETIONS_ROUTE", "PRIORITIES", "ClientRequest", "parse_request"]

PRIORITIES = ("critical", "normal", "batch")


@dataclass
class ClientRequest:
    route: str
    openai: OpenAIRequest  # the one parsed value; what is sent to replicas is its serialization
    priority: str
    session_key: str | None

    @property
    def model(self) -> str:
        return self.openai.model

    @property
    def stream(self) -> bool:
        return self.openai.stream

    @property
    def max_tokens(self) -> int | None:
        return self.openai.max_tokens

    @property
    def num_prompt_chars(self) -> int:
        return self.openai.num_prompt_chars

    @property
    def transferable(self) -> bool:
        """Whether a stream's state can move to another replica mid-stream. Everything that could
        not (``n`` > 1, several prompts, ``logprobs``, ``echo``) is refused by the contract."""
        return True

    @property
    def base_model(self) -> str:
        return self.model.partition(":")[0]

    @property
    def adapter(self) -> str | None:
        base, sep, adapter = self.model.partition(":")
        return adapter if sep and adapter else None

    def payload(self, resume_token_ids: list[int] | None = None) -> bytes:
        """The body sent to a replica: the parsed request as it stands now, plus ``resume_token_ids``."""
        body = self.openai.to_body()
        if resume_token_ids:
            body["resume_token_ids"] = resume_token_ids
        return orjson.dumps(body)


def parse_request(route: str, body: dict[str, Any], headers: Mapping[str, str],
                  default_model: str | None) -> ClientRequest:
    """Check ``body`` for ``route``; raise 400/422 errors that name the offending field."""
    if "resume_token_ids" in body:
        raise InvalidRequestError("'resume_token_ids' is set by the gateway, not by clients",
                                  param="resume_token_ids")
    req = parse_body("chat" if route == CHAT_ROUTE else "completion", body, default_model=default_model,
                     allow_empty_messages=hdr.server_keeps_history(headers))
    priority = (headers.get(hdr.PRIORITY) or "normal").lower()
    if priority not in PRIORITIES:
        raise InvalidRequestError(f"{hdr.PRIORITY} must be one of {', '.join(PRIORITIES)}, got {priority!r}",
                                  param=hdr.PRIORITY)
    return ClientRequest(route=route, openai=req, priority=priority,
                         session_key=hdr.session_id(headers) or req.user or None)
