"""The one OpenAI request model: one precedence rule, refusals in one place, a lossless round trip."""

from __future__ import annotations

import pytest

from unbroken.contract.openai import UNSUPPORTED, parse_body
from unbroken.errors import InvalidRequestError, ValidationError

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):  # type: ignore[no-untyped-def]
    return {"model": "qwen", "messages": MSGS, **fields}


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse_body("chat", chat(max_tokens=100, max_completion_tokens=1000)).max_tokens == 1000
    assert parse_body("chat", chat(max_tokens=100)).max_tokens == 100
    assert parse_body("chat", chat(max_completion_tokens=7, max_tokens=None)).max_tokens == 7
    # completions have no max_completion_tokens in OpenAI's API
    assert parse_body("completion", {"model": "q", "prompt": "x", "max_tokens": 5}).max_tokens == 5


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"50256": -100}), ("tools", [{"type": "function"}]), ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("logprobs", True), ("top_logprobs", 3), ("echo", True), ("n", 2), ("best_of", 3), ("functions", [{}]),
])
def test_unsupported_fields_are_refused_with_400_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        parse_body("chat", chat(**{field: value}))
    assert e.value.status == 400 and e.value.param == field and field in e.value.message
    assert e.value.to_dict()["error"]["param"] == field


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {}), ("tools", []), ("tool_choice", "none"), ("response_format", {"type": "text"}),
    ("presence_penalty", 0), ("frequency_penalty", 0.0), ("logprobs", False), ("top_logprobs", 0),
    ("n", 1), ("best_of", 1), ("echo", False),
])
def test_neutral_values_of_unsupported_fields_are_accepted(field: str, value: object) -> None:
    assert parse_body("chat", chat(**{field: value})).model == "qwen"


def test_every_unsupported_field_has_a_refused_value() -> None:
    # a value that is never neutral: every field in the table is really refused
    for name in UNSUPPORTED:
        with pytest.raises(InvalidRequestError):
            parse_body("chat", chat(**{name: 7}))


@pytest.mark.parametrize("value", [-1, 21, 2.5, "3"])
def test_top_logprobs_range_is_0_to_20(value: object) -> None:
    with pytest.raises(ValidationError) as e:
        parse_body("chat", chat(top_logprobs=value))
    assert e.value.param == "top_logprobs"


def test_several_prompts_are_refused() -> None:
    with pytest.raises(InvalidRequestError) as e:
        parse_body("completion", {"model": "q", "prompt": ["a", "b"]})
    assert e.value.param == "prompt"


@pytest.mark.parametrize("kind,body", [
    ("chat", chat(max_tokens=3, max_completion_tokens=9, temperature=0.3, top_k=-1, seed=4, stop="x",
                  stream=True, stream_options={"include_usage": True}, user="u", ignore_eos=True, min_tokens=2,
                  messages=[{"role": "system", "content": [{"type": "text", "text": "a"}]},
                            {"role": "assistant", "content": None}])),
    ("chat", chat()),
    ("completion", {"model": "q", "prompt": [1, 2, 3], "max_tokens": 4}),
    ("completion", {"model": "q", "prompt": ["only"], "stream": True}),
])
def test_serialized_request_parses_back_to_the_same_value(kind: str, body: dict) -> None:
    req = parse_body(kind, body)  # type: ignore[arg-type]
    assert parse_body(kind, req.to_body()) == req  # type: ignore[arg-type]
    req.max_tokens = 2
    req.resume_token_ids = [5, 6]
    again = parse_body(kind, req.to_body())  # type: ignore[arg-type]
    assert again.max_tokens == 2 and again.resume_token_ids == [5, 6] and again == req
