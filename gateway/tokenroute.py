"""The token route: a stream sent to vLLM or SGLang by token ids, so that it resumes token-exact.

When a request's model has a tokenizer (``replicas.tokenizers``) and the replica is vLLM or SGLang,
the gateway applies the chat template itself (``gateway/tokenizer.py``) and sends the prompt's ids
(plus, when resuming, every id the client already has) through the engine's token-id API:

- vLLM (followed: v0.11.0, ``vllm/entrypoints/openai/protocol.py`` ``CompletionRequest`` and
  ``serving_completion.py``): ``POST /v1/completions`` with ``prompt`` = a list of token ids and
  ``return_token_ids: true`` (added in v0.10.2): each streamed choice then carries ``token_ids``
  (the ids of that chunk; the first chunk also ``prompt_token_ids``), then ``data: [DONE]``;
- SGLang (followed: v0.5.2, ``python/sglang/srt/managers/io_struct.py`` ``GenerateReqInput`` and
  ``tokenizer_manager.py``): ``POST /generate`` with ``input_ids``, ``sampling_params``
  (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k`` (-1 = off), ``min_new_tokens``,
  ``ignore_eos``, ``stop``) and ``stream: true``; each event is ``{"text", "output_ids",
  "meta_info": {"id", "finish_reason": null | {"type": "stop" | "length" | "abort", ...},
  "prompt_tokens", "completion_tokens", ...}}``, then ``data: [DONE]``. ``output_ids`` hold every id
  so far or only the new ones, depending on the version and on ``--stream-output`` (later
  ``--incremental-streaming-output``); the new ids are read as the last ``completion_tokens`` minus
  those seen, which is right either way.

:class:`EngineStreamTranslator` turns the engine's events back into the client's OpenAI chunks
(``chat.completion.chunk`` with a role chunk first, or ``text_completion``) with ``token_ids`` on each
choice, the text decoded here from the ids (so that a stream continued on another engine decodes the
same), ``stop`` strings cut here too, and a usage chunk when the client asked for one. From there on
the stream is like one from the project's own replicas: the relay records its ids and resumes it on
any replica that takes ids (``resume_token_ids`` for the project's replicas, prompt + generated ids
for another vLLM or SGLang).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.backends.errors import is_error_event
from gateway.protocol import CHAT_ROUTE, ClientRequest
from gateway.tokenizer import ChatTokenizer, IncrementalDecoder

TOKEN_ROUTE_KINDS = frozenset({"vllm", "sglang"})
ENGINE_PATHS = {"vllm": "/v1/completions", "sglang": "/generate"}
DONE = b"[DONE]"


class EngineProtocolError(Exception):
    """An engine event this route cannot read (the replica's fault: the stream goes elsewhere)."""


class EngineTooOld(EngineProtocolError):
    """The engine ignores the token-id fields this route needs."""


_MAX_TOKEN_ID = 1 << 31


def _token_ids(value: Any) -> list[int]:
    """An engine's token ids, checked: untrusted, they must be a list of ids before anything decodes them."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(i) is int and 0 <= i < _MAX_TOKEN_ID for i in value):
        raise EngineProtocolError(f"the engine sent token ids that are not a list of ids: {str(value)[:80]}")
    return value


class TokenRoute:
    """One request's way to vLLM and SGLang by ids: its prompt ids (encoded once) and the engine
    call for a replica kind, from the start or after ``resume_ids``."""

    def __init__(self, req: ClientRequest, tok: ChatTokenizer) -> None:
        self.req = req
        self.tok = tok
        self.model = req.base_model  # whose tokenizer this is
        self._prompt_ids: list[int] | None = None

    @property
    def prompt_ids(self) -> list[int]:
        if self._prompt_ids is None:
            o = self.req.openai
            if o.kind == "chat":
                self._prompt_ids = self.tok.chat_prompt_ids(o.messages)
            elif o.prompt_token_ids is not None:
                self._prompt_ids = list(o.prompt_token_ids)
            else:  # as the engines encode a string prompt
                self._prompt_ids = self.tok.tokenizer.encode(o.prompt_text or "", add_special_tokens=True).ids
        return self._prompt_ids

    def engine_body(self, kind: str, resume_ids: list[int]) -> dict[str, Any]:
        """The body for ``kind``'s token-id API, continuing after ``resume_ids``."""
        o = self.req.openai
        ids = self.prompt_ids + list(resume_ids)
        max_tokens = None if o.max_tokens is None else max(1, o.max_tokens - len(resume_ids))
        min_tokens = max(0, o.min_tokens - len(resume_ids))
        if kind == "vllm":
            body: dict[str, Any] = {"model": o.model, "prompt": ids, "stream": True, "return_token_ids": True,
                                    "temperature": o.temperature, "top_p": o.top_p}
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if o.top_k:
                body["top_k"] = o.top_k
            if min_tokens:
                body["min_tokens"] = min_tokens
            if o.ignore_eos:
                body["ignore_eos"] = True
            if o.seed is not None:
                body["seed"] = o.seed
            if o.stop:
                body["stop"] = list(o.stop)
            return body
        if kind == "sglang":
            params: dict[str, Any] = {"temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k or -1}
            if max_tokens is not None:
                params["max_new_tokens"] = max_tokens
            if min_tokens:
                params["min_new_tokens"] = min_tokens
            if o.ignore_eos:
                params["ignore_eos"] = True
            if o.stop:
                params["stop"] = list(o.stop)
            return {"input_ids": ids, "sampling_params": params, "stream": True}
        raise ValueError(f"no token route to a {kind} replica")

    def engine_call(self, kind: str, resume_ids: list[int]) -> tuple[str, bytes, "EngineStreamTranslator"]:
        """``(path, body, translator)`` for one attempt on a replica of ``kind``."""
        body = orjson.dumps(self.engine_body(kind, resume_ids))
        return ENGINE_PATHS[kind], body, EngineStreamTranslator(kind, self.req, self.tok, list(resume_ids),
                                                                len(self.prompt_ids))


class EngineStreamTranslator:
    """One engine stream's events as the client's OpenAI chunks (see the module's docstring). Pure:
    payloads in, payloads out."""

    def __init__(self, kind: str, req: ClientRequest, tok: ChatTokenizer, before_ids: list[int],
                 num_prompt_tokens: int) -> None:
        self.kind = kind
        self.chat = req.route == CHAT_ROUTE
        self.model = req.model
        self.include_usage = req.openai.include_usage
        self.stops = tuple(s for s in req.openai.stop if s)
        self.num_prompt_tokens = num_prompt_tokens
        self.num_before = len(before_ids)
        self.num_new = 0
        self.decoder = IncrementalDecoder(tok, before_ids)
        # Text a stop string may still claim, held back; after a resume, what the first engine held.
        self.held = self._stop_prefix(tok.decode(before_ids)) if self.stops and before_ids else ""
        self.finished = False
        self.opened = False
        self.id = ""
        self.created = int(time.time())

    def feed(self, payloads: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for p in payloads:
            if p == DONE:
                if self.finished:  # [DONE] before a finish is an early end: the relay resumes it
                    out.append(p)
                continue
            try:
                obj = orjson.loads(p)
            except orjson.JSONDecodeError:
                out.append(p)  # the rewriter reports it as a malformed event
                continue
            if not isinstance(obj, dict) or is_error_event(obj):
                out.append(p)
                continue
            if self.finished:
                continue
            try:
                new_ids, finish = self._read(obj)
            except EngineProtocolError as e:  # the replica's fault: the request goes elsewhere
                out.append(orjson.dumps({"error": {"message": str(e), "type": "InternalServerError",
                                                   "code": 500}}))
                return out
            if not self.opened:
                self.opened = True
                if self.chat:
                    out.append(self._chunk({"role": "assistant", "content": ""}, None, None))
            if not new_ids and finish is None:
                continue
            self.num_new += len(new_ids)
            text, finish = self._cut(self.decoder.push(new_ids), finish)
            out.append(self._chunk(text, finish, new_ids))
            if finish is not None:
                self.finished = True
                if self.include_usage:
                    out.append(self._usage())
        return out

    # -- per engine ------------------------------------------------------------------------------

    def _read(self, obj: dict[str, Any]) -> tuple[list[int], str | None]:
        """The new ids of one engine event and its finish reason (None while running)."""
        if self.kind == "vllm":
            if not self.id:
                rid = str(obj.get("id") or "")
                self.id = rid.replace("cmpl-", "chatcmpl-", 1) if self.chat and rid.startswith("cmpl-") else rid
                created = obj.get("created")
                self.created = created if type(created) is int else self.created
            choices = obj.get("choices") or []
            if not isinstance(choices, list):
                raise EngineProtocolError("the engine sent choices that are not a list")
            ch = choices[0] if choices and isinstance(choices[0], dict) else {}
            if choices and "token_ids" not in ch:
                raise EngineTooOld("vLLM sent no token_ids: return_token_ids needs vLLM 0.10.2 or later")
            ids = _token_ids(ch.get("token_ids"))
            finish = ch.get("finish_reason")
            return ids, finish if finish in ("stop", "length") else None
        meta = obj.get("meta_info") or {}
        if not isinstance(meta, dict):
            raise EngineProtocolError("the engine sent a meta_info that is not an object")
        if not self.id:
            rid = str(meta.get("id") or "")
            self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{rid}"
        ids = _token_ids(obj.get("output_ids"))
        num = meta.get("completion_tokens")
        if type(num) is int:  # cumulative or incremental output_ids: the last (num - seen) are new
            n = max(0, num - self.num_new)
            ids = ids[len(ids) - n:] if n else []
        fr = meta.get("finish_reason")
        finish = fr.get("type") if isinstance(fr, dict) else None
        return ids, finish if finish in ("stop", "length") else None

    # -- stop strings ----------------------------------------------------------------------------

    def _stop_prefix(self, text: str) -> str:
        """The longest end of ``text`` that begins a stop string (held back until it is decided)."""
        for n in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return text[-n:]
        return ""

    def _cut(self, text: str, finish: str | None) -> tuple[str, str | None]:
        """What of ``text`` to send now: up to a stop string (which ends the stream), holding back an
        end that may begin one."""
        if not self.stops:
            return text, finish
        pending = self.held + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return pending[:min(hits)], "stop"
        if finish is not None:
            self.held = ""
            return pending, finish
        self.held = self._stop_prefix(pending)
        return pending[:len(pending) - len(self.held)], None

    # -- chunks ----------------------------------------------------------------------------------

    def _chunk(self, content: Any, finish: str | None, ids: list[int] | None) -> bytes:
        if self.chat:
            delta = content if isinstance(content, dict) else ({"content": content} if content else {})
            ch: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        if ids is not None:
            ch["token_ids"] = ids
        return orjson.dumps({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": self.model, "choices": [ch]})

    def _usage(self) -> bytes:
        num = self.num_before + self.num_new
        return orjson.dumps({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": self.model, "choices": [],
                             "usage": {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": num,
                                       "total_tokens": self.num_prompt_tokens + num}})
