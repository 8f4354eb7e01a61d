"""Parsing and validating OpenAI bodies, the context-length check, and the response shapes."""

from __future__ import annotations

import pytest

from replica.openai_api import (
    build_generation_request,
    chat_chunk,
    chat_completion_response,
    completion_chunk,
    finish_reason_str,
    models_response,
    parse_chat_request,
    parse_completion_request,
    resolve_adapter,
    usage_chunk,
    usage_dict,
)
from replica.protocol import FinishReason
from unbroken.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, ValidationError

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": "qwen", "messages": MSGS, **fields}


def test_chat_body_with_every_supported_field():
    req = parse_chat_request(chat(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_tokens=2, ignore_eos=True, seed=3,
        stop=["\n\n", "END"], stream=True, stream_options={"include_usage": True}, user="u1",
        resume_token_ids=[5, 6], frequency_penalty=0.0, some_unknown_field={"x": 1},
    ), vocab_size=100)
    assert req.kind == "chat" and req.model == "qwen"
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k) == (7, 0.5, 0.9, 40)
    assert (req.min_tokens, req.ignore_eos, req.seed) == (2, True, 3)
    assert req.stop == ("\n\n", "END") and req.stream and req.include_usage
    assert req.user == "u1" and req.resume_token_ids == [5, 6]


def test_defaults_and_nulls():
    req = parse_chat_request(chat(temperature=None, max_tokens=None, stop=None))
    assert req.max_tokens is None and req.temperature == 1.0 and req.top_p == 1.0
    assert req.top_k == 0 and req.stop == () and not req.stream and not req.include_usage
    assert parse_chat_request(chat(top_k=-1)).top_k == 0  # vLLM's "no top-k"
    assert parse_chat_request(chat(stop="x")).stop == ("x",)


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=9)).max_tokens == 9


def test_include_usage_only_with_stream():
    assert not parse_chat_request(chat(stream_options={"include_usage": True})).include_usage


def test_content_parts_are_joined():
    req = parse_chat_request(chat(messages=[
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]))
    assert req.messages == [{"role": "system", "content": "ab"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("fields,param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"seed": 1.5}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"stream": "true"}, "stream"),
    ({"stream_options": "x"}, "stream_options"),
    ({"stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
    ({"user": 5}, "user"),
    ({"resume_token_ids": "1,2"}, "resume_token_ids"),
    ({"resume_token_ids": [1, "2"]}, "resume_token_ids"),
    ({"resume_token_ids": [1, 1000]}, "resume_token_ids"),
    ({"resume_token_ids": [-1]}, "resume_token_ids"),
    ({"model": 5}, "model"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
])
def test_wrong_types_and_ranges_are_422_naming_the_param(fields, param):
    with pytest.raises(ValidationError) as e:
        parse_chat_request(chat(**fields), vocab_size=100)
    assert e.value.status == 422 and e.value.param == param
    assert param.split(".")[0].split("[")[0] in e.value.message


@pytest.mark.parametrize("body,param", [
    ({"messages": MSGS}, "model"),
    ({"model": "qwen"}, "messages"),
    ({"model": "qwen", "messages": []}, "messages"),
])
def test_missing_params_are_400(body, param):
    with pytest.raises(InvalidRequestError) as e:
        parse_chat_request(body)
    assert e.value.status == 400 and e.value.param == param


def test_n_above_one_is_refused_clearly():
    assert parse_chat_request(chat(n=1)).model == "qwen"
    with pytest.raises(InvalidRequestError) as e:
        parse_chat_request(chat(n=3))
    assert e.value.status == 400 and e.value.param == "n" and "n = 1" in e.value.message
    with pytest.raises(ValidationError):
        parse_chat_request(chat(n=0))


def test_logprobs_is_refused():
    with pytest.raises(InvalidRequestError) as e:
        parse_chat_request(chat(logprobs=True))
    assert e.value.param == "logprobs"
    assert parse_chat_request(chat(logprobs=False)).model == "qwen"


def test_completion_prompt_forms():
    assert parse_completion_request({"model": "qwen", "prompt": "hi"}).prompt_text == "hi"
    assert parse_completion_request({"model": "qwen", "prompt": ["hi"]}).prompt_text == "hi"
    assert parse_completion_request({"model": "qwen", "prompt": [1, 2]}).prompt_token_ids == [1, 2]
    assert parse_completion_request({"model": "qwen", "prompt": [[1, 2]]}).prompt_token_ids == [1, 2]
    with pytest.raises(InvalidRequestError):
        parse_completion_request({"model": "qwen", "prompt": ["a", "b"]})
    with pytest.raises(InvalidRequestError):
        parse_completion_request({"model": "qwen", "prompt": ""})
    with pytest.raises(InvalidRequestError):
        parse_completion_request({"model": "qwen"})
    with pytest.raises(ValidationError) as e:
        parse_completion_request({"model": "qwen", "prompt": [1, 500]}, vocab_size=100)
    assert e.value.param == "prompt"
    with pytest.raises(ValidationError):
        parse_completion_request({"model": "qwen", "prompt": 5})
    # max_completion_tokens is a chat field; completions read max_tokens only.
    assert parse_completion_request({"model": "qwen", "prompt": "x", "max_tokens": 3}).max_tokens == 3


def test_resolve_adapter():
    assert resolve_adapter("qwen", "qwen", ["a"]) is None
    assert resolve_adapter("qwen:a", "qwen", ["a"]) == "a"
    for bad in ("gpt-4", "qwen:b", "other:a", "qwen:"):
        with pytest.raises(ModelNotFoundError) as e:
            resolve_adapter(bad, "qwen", ["a"])
        assert e.value.status == 404 and "qwen:a" in e.value.message


def test_context_length_checks():
    req = parse_chat_request(chat(max_tokens=10))
    g = build_generation_request(req, list(range(90)), request_id="r", adapter=None, max_model_len=100)
    assert g.sampling.max_tokens == 10 and g.prompt_token_ids == list(range(90))
    with pytest.raises(ContextLengthError) as e:
        build_generation_request(req, list(range(91)), request_id="r", adapter=None, max_model_len=100)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and "100" in e.value.message
    with pytest.raises(ContextLengthError):
        build_generation_request(parse_chat_request(chat()), list(range(100)), request_id="r", adapter=None,
                                 max_model_len=100)


def test_default_max_tokens_fills_the_context_and_counts_resume_tokens():
    req = parse_chat_request(chat(resume_token_ids=[1, 2, 3], seed=4, temperature=0))
    g = build_generation_request(req, list(range(40)), request_id="r", adapter="a", max_model_len=100,
                                 session_id="s")
    assert g.sampling.max_tokens == 60  # resume tokens are part of max_tokens
    assert g.resume_token_ids == [1, 2, 3] and g.adapter == "a" and g.session_id == "s"
    assert g.sampling.greedy and g.sampling.seed == 4


def test_response_shapes():
    usage = usage_dict(5, 3, 2)
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                     "prompt_tokens_details": {"cached_tokens": 2}}
    r = chat_completion_response(response_id="c1", model="qwen", created=1, text="hey", token_ids=[1, 2],
                                 finish_reason="stop", usage=usage)
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert r["choices"][0]["token_ids"] == [1, 2]
    c = chat_chunk(response_id="c1", model="qwen", created=1, delta={"content": "x"}, token_ids=[3],
                   include_usage=True)
    assert c["object"] == "chat.completion.chunk" and c["usage"] is None
    assert c["choices"][0]["finish_reason"] is None and c["choices"][0]["token_ids"] == [3]
    t = completion_chunk(response_id="c2", model="qwen", created=1, text="y", token_ids=[4], finish_reason="length")
    assert t["object"] == "text_completion" and "usage" not in t
    u = usage_chunk(kind="chat", response_id="c1", model="qwen", created=1, usage=usage)
    assert u["choices"] == [] and u["usage"] == usage
    assert finish_reason_str(FinishReason.LENGTH) == "length"
    assert finish_reason_str(FinishReason.STOP) == "stop" and finish_reason_str(None) is None
    m = models_response("qwen", ["a", "b"], created=1)
    assert [d["id"] for d in m["data"]] == ["qwen", "qwen:a", "qwen:b"]
