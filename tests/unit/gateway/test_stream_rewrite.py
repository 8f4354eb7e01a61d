"""The resumed-stream rewriter, without sockets: what the client receives of the payloads replicas send."""

from __future__ import annotations

import orjson

from gateway.stream_rewrite import DONE_EVENT, StreamRewriter
from unbroken.errors import ContextLengthError, UpstreamError


def _chunk(cid: str, ids: list[int], *, finish: str | None = None, created: int = 1, model: str = "m") -> bytes:
    return orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": {"content": "x" * len(ids)}, "token_ids": ids,
                                      "finish_reason": finish}]})


def _role(cid: str) -> bytes:
    return orjson.dumps({"id": cid, "created": 9, "model": "m2",
                         "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})


def _events(data: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for block in data.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: ")
        payload = block[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def test_first_upstream_is_relayed_as_sent_and_ids_recorded() -> None:
    first = orjson.loads(_chunk("a", [1, 2]))
    rw = StreamRewriter(first, transferable=True)
    assert _events(rw.begin_upstream([_role("a")]))[0]["choices"][0]["delta"] == {"role": "assistant"}
    batch = [_chunk("a", [1, 2]), _chunk("a", [3])]
    out = rw.rewrite(batch, replica_id="r1", num_failovers=0)
    assert out.data == b"".join(b"data: " + p + b"\n\n" for p in batch)  # untouched bytes
    assert not out.done and out.failure is None and out.end_error is None
    assert rw.sent_ids == [1, 2, 3] and not rw.finish_seen


def test_resumed_stream_drops_role_chunk_and_rewrites_id_created_model_and_usage() -> None:
    rw = StreamRewriter(orjson.loads(_chunk("orig", [1], created=100, model="qwen")), transferable=True)
    rw.begin_upstream([_role("orig")])
    rw.rewrite([_chunk("orig", [1], created=100, model="qwen"), _chunk("orig", [2], created=100, model="qwen")],
               replica_id="r1", num_failovers=0)
    assert rw.begin_upstream([_role("new")]) == b""  # the second replica's role chunk is dropped
    assert rw.resumed
    usage = orjson.dumps({"id": "new", "created": 5, "model": "other", "choices": [],
                          "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})
    out = rw.rewrite([_chunk("new", [3], created=5, model="other"),
                      _chunk("new", [4], finish="stop", created=5, model="other"), usage, b"[DONE]"],
                     replica_id="r2", num_failovers=1)
    ev = _events(out.data)
    assert out.done and ev[-1] == "[DONE]"
    for e in ev[:-1]:
        assert (e["id"], e["created"], e["model"]) == ("orig", 100, "qwen")
    assert ev[1]["unbroken"] == {"failovers": 1, "replica_id": "r2"}
    assert ev[2]["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    assert ev[2]["unbroken"] == {"failovers": 1, "replica_id": "r2"}
    assert rw.sent_ids == [1, 2, 3, 4] and rw.finish_seen


def test_usage_not_recounted_for_a_stream_that_cannot_move() -> None:
    rw = StreamRewriter({"id": "a"}, transferable=False)
    rw.begin_upstream([])
    rw.begin_upstream([])
    usage = {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    out = rw.rewrite([orjson.dumps({"id": "b", "choices": [], "usage": dict(usage)})], replica_id="r", num_failovers=1)
    assert _events(out.data)[0]["usage"] == usage


def test_only_choice_zero_ids_are_recorded() -> None:
    rw = StreamRewriter({}, transferable=False)
    rw.begin_upstream([])
    two = orjson.dumps({"id": "a", "choices": [{"index": 1, "token_ids": [7]}, {"index": 0, "token_ids": [8]}]})
    rw.rewrite([two], replica_id="r", num_failovers=0)
    assert rw.sent_ids == [8]


def test_error_the_replica_is_to_blame_for_is_a_failure_after_what_came_before() -> None:
    rw = StreamRewriter({}, transferable=True)
    rw.begin_upstream([])
    err = orjson.dumps(UpstreamError("engine died").to_dict())
    out = rw.rewrite([_chunk("a", [1]), err, _chunk("a", [2])], replica_id="r", num_failovers=0)
    assert isinstance(out.failure, UpstreamError) and out.end_error is None
    assert [e["choices"][0]["token_ids"] for e in _events(out.data)] == [[1]]  # nothing after the error
    assert rw.sent_ids == [1]


def test_client_error_event_ends_the_stream_with_that_error() -> None:
    rw = StreamRewriter({}, transferable=True)
    rw.begin_upstream([])
    err = ContextLengthError("too long", param="messages")
    out = rw.rewrite([orjson.dumps(err.to_dict())], replica_id="r", num_failovers=0)
    assert out.failure is None and isinstance(out.end_error, ContextLengthError)
    assert out.end_error.status == 400  # status from the one table in unbroken/errors.py
    assert _events(out.data) == [err.to_dict()]
    assert not out.data.endswith(DONE_EVENT)
