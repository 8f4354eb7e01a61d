"""The answer checks: SSE form, error events, complete streams, every token accounted for."""

from __future__ import annotations

import orjson
import pytest

from loadtest.checks import (
    ResponseCheckError,
    SSEParser,
    check_completion,
    classify_mismatch,
    parse_completion,
    parse_stream,
)


def _chunk(ids: list[int], text: str, finish: str | None = None, cid: str = "c1", **extra: object) -> str:
    body = {"id": cid, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "token_ids": ids, "finish_reason": finish}],
            **extra}
    return "data: " + orjson.dumps(body).decode()


def _stream(*events: str) -> list[str]:
    lines: list[str] = []
    for e in events:
        lines += [e, ""]
    return lines


ROLE = "data: " + orjson.dumps({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                         "finish_reason": None}]}).decode()


def test_a_good_stream_parses_with_its_usage_and_failovers() -> None:
    usage = "data: " + orjson.dumps({"id": "c1", "choices": [], "usage": {"completion_tokens": 3}}).decode()
    c = parse_stream(_stream(ROLE, ": keep-alive", _chunk([1, 2], "ab"),
                             _chunk([3], "c", "length", unbroken={"failovers": 1}), usage, "data: [DONE]"))
    assert c.token_ids == [1, 2, 3] and c.text == "abc" and c.finish_reason == "length"
    assert c.failovers == 1 and c.usage == {"completion_tokens": 3}
    check_completion(c, max_tokens=3, ignore_eos=True, reference=[1, 2, 3], reference_text="abc")


@pytest.mark.parametrize("events, kind", [
    ((ROLE, _chunk([1], "a")), "stream_incomplete"),  # no finish, no [DONE]
    ((ROLE, _chunk([1], "a", "stop")), "stream_incomplete"),  # no [DONE]
    ((ROLE, _chunk([1], "a", "stop"), "data: [DONE]", _chunk([2], "b")), "sse_invalid"),
    ((ROLE, "data: {not json"), "sse_invalid"),
    ((ROLE, "garbage line"), "sse_invalid"),
    ((ROLE, _chunk([1], "a"), _chunk([2], "b", cid="other")), "sse_invalid"),
    ((ROLE, _chunk([1], "a"), 'data: {"error": {"message": "boom", "type": "server_error", "code": "x"}}'),
     "sse_error_event"),
    ((ROLE, _chunk([], "a", "stop"), "data: [DONE]"), "token_ids_missing"),
    ((ROLE, _chunk([1], "a", "stop"), _chunk([2], "b"), "data: [DONE]"), "sse_invalid"),
])
def test_broken_streams_are_failures_of_their_kind(events: tuple[str, ...], kind: str) -> None:
    with pytest.raises(ResponseCheckError) as e:
        parse_stream(_stream(*events))
    assert e.value.kind == kind


def test_sse_parser_joins_multiline_data_and_flushes_at_eof() -> None:
    p = SSEParser()
    assert p.feed_line("data: a") is None
    assert p.feed_line("data: b\r") is None
    assert p.feed_line("") == "a\nb"
    assert p.feed_line("data: tail") is None
    assert p.finish() == "tail"


def test_token_accounting() -> None:
    c = parse_stream(_stream(ROLE, _chunk([1, 2, 2, 3], "abbc", "length"), "data: [DONE]"))
    with pytest.raises(ResponseCheckError) as e:
        check_completion(c, max_tokens=3, ignore_eos=False)
    assert e.value.kind == "tokens_repeated"
    c = parse_stream(_stream(ROLE, _chunk([1, 2], "ab", "length"), "data: [DONE]"))
    with pytest.raises(ResponseCheckError) as e:
        check_completion(c, max_tokens=3, ignore_eos=False)
    assert e.value.kind == "tokens_missing"
    c = parse_stream(_stream(ROLE, _chunk([1, 2, 4], "abd", "length"), "data: [DONE]"))
    with pytest.raises(ResponseCheckError) as e:
        check_completion(c, max_tokens=3, ignore_eos=True, reference=[1, 2, 3])
    assert e.value.kind == "token_mismatch"
    with pytest.raises(ResponseCheckError) as e:
        check_completion(c, max_tokens=3, ignore_eos=True, reference=[1, 2, 4], reference_text="abX")
    assert e.value.kind == "text_mismatch"


def test_usage_must_match_the_ids() -> None:
    c = parse_completion({"id": "x", "choices": [{"message": {"content": "ab"}, "token_ids": [1, 2],
                                                  "finish_reason": "length"}],
                          "usage": {"completion_tokens": 3}})
    with pytest.raises(ResponseCheckError) as e:
        check_completion(c, max_tokens=3, ignore_eos=False)
    assert e.value.kind == "tokens_missing"


def test_non_stream_answers() -> None:
    c = parse_completion({"id": "x", "choices": [{"message": {"content": "ab"}, "token_ids": [1, 2],
                                                  "finish_reason": "length"}],
                          "usage": {"completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 7}}})
    assert c.token_ids == [1, 2] and c.cached_tokens == 7
    for body, kind in [({"error": {"message": "x"}}, "error_body"),
                       ({"choices": []}, "bad_body"),
                       ({"choices": [{"message": {"content": "a"}, "finish_reason": "stop"}]}, "token_ids_missing")]:
        with pytest.raises(ResponseCheckError) as e:
            parse_completion(body)
        assert e.value.kind == kind


def test_mismatch_classification() -> None:
    assert classify_mismatch([1, 2, 2, 3], [1, 2, 3]) == "tokens_repeated"
    assert classify_mismatch([1, 3], [1, 2, 3]) == "tokens_missing"
    assert classify_mismatch([9, 8, 7], [1, 2, 3], in_session_turn=1) == "context_lost"
    assert classify_mismatch([9, 8, 7], [1, 2, 3], in_session_turn=0) == "token_mismatch"
    assert classify_mismatch([1, 8, 7], [1, 2, 3], in_session_turn=2) == "token_mismatch"
