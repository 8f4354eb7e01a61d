"""Backend kinds without sockets: the registry, metric parsing, engines' error bodies, the resume
bodies per mode and the rewriter's handling of malformed events and text-mode resumes."""

from __future__ import annotations

import orjson
import pytest

from gateway.backends import BACKENDS, ResumeMode, make_probe
from gateway.backends.errors import engine_error, normalize_error
from gateway.backends.prom import gauges
from gateway.config import GatewayConfig
from gateway.resume import resume_body
from gateway.stream_rewrite import StreamRewriter
from unbroken.errors import ContentPolicyError, ContextLengthError, OverloadedError, UpstreamError


def test_registry_lists_the_supported_kinds() -> None:
    from gateway.config import KIND_NAMES

    assert BACKENDS.names() == ["auto", "llamacpp", "openai", "sglang", "tgi", "unbroken", "vllm"] == list(KIND_NAMES)
    with pytest.raises(ValueError, match="supported: auto, llamacpp, openai, sglang, tgi, unbroken, vllm"):
        make_probe("ollama-ish")
    assert make_probe("vllm").traits.resume_chat is ResumeMode.TEXT
    assert make_probe("tgi").traits.resume_chat is ResumeMode.NONE
    assert make_probe("unbroken").traits.resume_completions is ResumeMode.TOKEN


def test_config_rejects_unknown_kinds_and_modes() -> None:
    with pytest.raises(ValueError, match="unknown replica kind 'vlm'"):
        GatewayConfig.model_validate({"replicas": {"kind": "vlm"}})
    with pytest.raises(ValueError, match="must be token, text or none"):
        GatewayConfig.model_validate({"replicas": {"resume": {"vllm": "maybe"}}})
    cfg = GatewayConfig.model_validate({"replicas": {"kind": "vllm", "urls": ["http://a:8000"],
                                                     "kinds": {"http://b:8000": "sglang"}}})
    assert cfg.replicas.kind == "vllm"


def test_prometheus_gauges_sum_label_sets_and_skip_garbage() -> None:
    text = ('# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="q"} 3.0\n'
            'vllm:num_requests_running{engine="1",model_name="q"} 2.0\n'
            'vllm:kv_cache_usage_perc{model_name="q"} 0.25\n'
            'other_metric 9\n')
    assert gauges(text, {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"}) == {
        "vllm:num_requests_running": 5.0, "vllm:kv_cache_usage_perc": 0.25}
    assert gauges("this is {not prometheus", {"x"}) == {}


@pytest.mark.parametrize("status,body,cls", [
    (400, {"error": {"message": "This model's maximum context length is 20 tokens. However, you requested 40",
                     "type": "BadRequestError", "param": None, "code": 400}}, ContextLengthError),  # vLLM
    (400, {"object": "error", "message": "Requested token count exceeds the model's maximum context length of 20",
           "type": "BadRequestError", "param": None, "code": 400}, ContextLengthError),  # SGLang
    (422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 20. Given: 30",
           "error_type": "validation"}, ContextLengthError),  # TGI
    (400, {"error": {"message": "refused", "type": "invalid_request_error", "code": "content_policy_violation"}},
     ContentPolicyError),
    (400, {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                     "type": "exceed_context_size_error", "n_prompt_tokens": 30, "n_ctx": 20}},
     ContextLengthError),  # llama-server
    (503, {"error": "Model is overloaded", "error_type": "overloaded"}, OverloadedError),  # TGI
    (500, {"object": "error", "message": "boom", "type": "InternalServerError", "code": 500}, UpstreamError),
])
def test_engine_errors_read_in_every_form(status: int, body: dict, cls: type) -> None:  # type: ignore[type-arg]
    err = engine_error(status, body)
    assert isinstance(err, cls)
    assert err.message  # the engine's reason is passed on
    assert normalize_error(body)["error"]["message"] == err.message


def test_engine_error_in_a_stream_has_no_status() -> None:
    err = engine_error(None, {"error": "CUDA out of memory", "error_type": "generation"})
    assert err.status == 500 and err.blames_replica


CHAT = {"model": "q", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}


def test_resume_bodies_per_mode() -> None:
    tok = resume_body(CHAT, "/v1/chat/completions", "token", sent_ids=[1, 2], sent_text="a b", num_tokens_sent=2)
    assert tok is not None and tok["resume_token_ids"] == [1, 2] and tok["messages"] == CHAT["messages"]
    txt = resume_body(CHAT, "/v1/chat/completions", "text", sent_ids=[], sent_text="a b ", num_tokens_sent=2)
    assert txt is not None
    assert txt["messages"][-1] == {"role": "assistant", "content": "a b "}
    assert txt["continue_final_message"] is True and txt["add_generation_prompt"] is False
    assert txt["max_tokens"] == 8 and CHAT["max_tokens"] == 10  # the client's body is not changed
    comp = resume_body({"prompt": "once", "max_tokens": 5}, "/v1/completions", "text", sent_ids=[],
                       sent_text=" upon", num_tokens_sent=1)
    assert comp == {"prompt": "once upon", "max_tokens": 4}
    assert resume_body(CHAT, "/v1/chat/completions", "none", sent_ids=[], sent_text="", num_tokens_sent=0) is None
    assert resume_body({"prompt": [1, 2]}, "/v1/completions", "text", sent_ids=[], sent_text="x",
                       num_tokens_sent=1) is None
    prefilled = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": "Sure"}]}
    assert resume_body(prefilled, "/v1/chat/completions", "text", sent_ids=[], sent_text="x",
                       num_tokens_sent=1) is None


def _chunk(text: str, finish: str | None = None, ids: list[int] | None = None) -> bytes:
    ch: dict = {"index": 0, "delta": {"content": text}, "finish_reason": finish}  # type: ignore[type-arg]
    if ids is not None:
        ch["token_ids"] = ids
    return orjson.dumps({"id": "c1", "created": 1, "model": "q", "choices": [ch]})


def test_malformed_event_is_a_failure_not_an_exception() -> None:
    rw = StreamRewriter({"id": "c1"}, transferable=True)
    out = rw.rewrite([_chunk("a "), b'{"id": "c1", "choices": [{"delta', b"[1, 2]"], replica_id="r", num_failovers=0)
    assert out.failure is not None and "malformed" in out.failure.message
    assert out.data.count(b"data: ") == 1 and rw.text_so_far == "a "


def test_text_resume_keeps_counting_and_stamps_inexact() -> None:
    rw = StreamRewriter({"id": "c1", "created": 1, "model": "q"}, transferable=True)
    rw.begin_upstream([])
    rw.rewrite([_chunk("a "), _chunk("b ")], replica_id="r0", num_failovers=0)
    assert not rw.ids_complete and rw.num_tokens_sent == 2
    rw.note_resume("text")
    rw.begin_upstream([b"role"])
    out = rw.rewrite([_chunk("c ", "length"), orjson.dumps({"id": "x", "created": 2, "model": "q", "choices": [],
                                                             "usage": {"prompt_tokens": 7, "completion_tokens": 1}})],
                     replica_id="r1", num_failovers=1)
    events = [orjson.loads(line[6:]) for line in out.data.split(b"\n\n") if line]
    assert events[0]["unbroken"] == {"failovers": 1, "replica_id": "r1", "resume": "text", "exact": False}
    assert events[1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert {e["id"] for e in events} == {"c1"}
    assert rw.text_so_far == "a b c "


def test_ids_stay_complete_while_every_chunk_carries_them() -> None:
    rw = StreamRewriter({"id": "c1"}, transferable=True)
    rw.rewrite([_chunk("a ", ids=[5]), _chunk("b ", ids=[6])], replica_id="r", num_failovers=0)
    assert rw.ids_complete and rw.sent_ids == [5, 6] and rw.num_tokens_sent == 2
