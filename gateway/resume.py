"""How a stream that broke after its first byte is asked of another replica, per resume mode
(``gateway/backends/``): pure functions of the client's body and what the client already has.

- ``token``: the body plus ``resume_token_ids`` (the project's replicas continue exactly);
- ``text``: chat gets the partial answer as a final assistant message with
  ``continue_final_message: true`` and ``add_generation_prompt: false`` (vLLM's and SGLang's
  parameters); completions get it appended to a string prompt. ``max_tokens`` shrinks by the tokens
  already sent. The continuation is re-tokenized by the engine: close, not token-exact;
- ``none``: no body: the stream cannot be resumed.

``None`` means the body cannot be resumed in that mode (e.g. a token-id prompt in text mode, or a
chat that already ends with an assistant prefix of the client's own).
"""

from __future__ import annotations

from typing import Any

from gateway.protocol import CHAT_ROUTE


# The project's own defaults that the contract's serialization always writes: another engine may not
# know them (older vLLM refuses top_k 0), and leaving them out means the same.
_PROJECT_DEFAULTS = {"top_k": 0, "min_tokens": 0, "ignore_eos": False}


def for_engine(body: dict[str, Any], kind: str = "") -> dict[str, Any]:
    """``body`` for another engine's OpenAI server: the project's neutral defaults left out, and the
    length limit as ``max_tokens``, the name every engine reads (llama-cpp-python 0.3 ignores
    ``max_completion_tokens`` and would generate to the end of its context). llama.cpp also gets
    ``repeat_penalty: 1.0``: the contract refuses any repetition penalty, and llama-cpp-python's
    default of 1.1 would make a greedy answer differ from the model's own."""
    out = {k: v for k, v in body.items() if not (k in _PROJECT_DEFAULTS and v == _PROJECT_DEFAULTS[k])}
    if "max_completion_tokens" in out:
        out["max_tokens"] = out.pop("max_completion_tokens")
    if kind == "llamacpp":
        out["repeat_penalty"] = 1.0
    return out


def resume_body(body: dict[str, Any], route: str, mode: str, *, sent_ids: list[int], sent_text: str,
                num_tokens_sent: int) -> dict[str, Any] | None:
    if mode == "token":
        out = dict(body)
        out["resume_token_ids"] = list(sent_ids)
        return out
    if mode != "text":
        return None
    out = dict(body)
    if route == CHAT_ROUTE:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or body.get("continue_final_message") \
                or (isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"):
            return None
        out["messages"] = [*messages, {"role": "assistant", "content": sent_text}]
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int):
                out[name] = max(1, body[name] - num_tokens_sent)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or body.get("echo"):
            return None
        out["prompt"] = prompt + sent_text
        if isinstance(body.get("max_tokens"), int):
            out["max_tokens"] = max(1, body["max_tokens"] - num_tokens_sent)
    if isinstance(body.get("min_tokens"), int):
        out["min_tokens"] = max(0, body["min_tokens"] - num_tokens_sent)
    return out
